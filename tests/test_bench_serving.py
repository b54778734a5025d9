"""Smoke test of scripts/bench_serving.py on the tiny model, and a differential check of its engine
(transformers' continuous batching) against ``model.generate`` greedy."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serving.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _script() -> ModuleType:
    name = "bench_serving_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_rows(tmp_path):
    bench = _script()
    out_len = 4
    rc = bench.main(["--tiny", "--quick", "--arms", "fp32,int4", "--rates", "20", "--n-requests", "3",
                     "--prompt-len", "8", "--output-len", str(out_len), "--context-lens", "12",
                     "--context-n-requests", "2", "--context-rate", "20", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    rows = data["rows"]
    assert {(r["phase"], r["arm"]) for r in rows} == {(p, a) for p in ("rate", "context") for a in ("fp32", "int4")}
    for row in rows:
        assert row["throughput_tok_s"] > 0 and row["req_s"] > 0
        assert row["n"] == row["n_ok"] == len(row["requests"])
        for req in row["requests"]:
            assert req["error"] is None
            assert req["n_out"] == out_len  # fixed output length: EOS ignored, stopped at max_new_tokens
            assert req["arrival"] <= req["first_token"] <= req["finish"]
    assert [r["prompt_len"] for r in rows if r["phase"] == "context"] == [12, 12]
    assert {r["ratio"] for r in data["ratios"]} == {"int4/fp32"}
    assert data["meta"]["not_run"] or "vllm-fp16" in data["meta"]["arms"]
    for f in ("serving.csv", "latency_vs_rate.png", "throughput_vs_context.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_workload_is_seeded_poisson():
    bench = _script()
    a = bench.workload(200, 4.0, 7, (10, 50), seed=3)
    assert a == bench.workload(200, 4.0, 7, (10, 50), seed=3)
    assert all(len(r.prompt) == 7 and all(10 <= t < 50 for t in r.prompt) for r in a)
    gaps = torch.tensor([b.offset - c.offset for b, c in zip(a[1:], a[:-1])])
    assert a[0].offset == 0 and (gaps > 0).all()
    assert 0.15 < gaps.mean().item() < 0.35  # exponential gaps of mean 1/rate = 0.25 s


@pytest.mark.parametrize("arm", ["fp32", "int4"])
def test_engine_matches_generate(arm):
    """Differential: the serving engine's greedy tokens for two prompts of different lengths, submitted at
    different times (so they share decode steps), equal ``model.generate`` greedy run on each alone."""
    bench = _script()
    model, _ = bench.load_arm(arm, tiny=True)
    g = torch.Generator().manual_seed(1)
    reqs = [bench.Request(0.0, torch.randint(3, 250, (5,), generator=g).tolist()),
            bench.Request(0.01, torch.randint(3, 250, (13,), generator=g).tolist())]
    recs = bench.serve_hf(model, reqs, output_len=6, return_tokens=True)
    for r, rec in zip(reqs, recs):
        ref = model.generate(torch.tensor([r.prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(r.prompt):].tolist()
        assert rec["tokens"] == ref
