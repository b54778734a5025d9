"""The multilingual code evaluator (BabelCode / MultiPL-E rows) end to end, with known completions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from quantlab.errors import ConfigError
from quantlab.evals.code import runner as runner_mod
from quantlab.evals.code.babelcode import load_babelcode
from quantlab.evals.code.multilingual import MultilingualCodeEval
from quantlab.generation import Completion, GenerationStats
from quantlab.tracking.paper_tables import paper_tables
from quantlab.types import RunContext

FIX = Path(__file__).parent / "fixtures"
BC = FIX / "babelcode" / "bc_humaneval_sample.jsonl"
SOL = {r["task_id"]: r for r in map(json.loads, (FIX / "babelcode" / "bc_solutions.jsonl").read_text().splitlines())}


class KnownCompletions:
    """Generation stand-in: the raw model-like output (stop sequence and junk included) of the fixture's
    correct solution for the languages in ``good``, its wrong one elsewhere."""

    def __init__(self, good: set[str]):
        self.good = good
        self.by_prompt = {p.prompt: p for p in load_babelcode(str(BC))}

    def __call__(self, model, tok, requests, cfg, desc=None, on_batch=None):
        from quantlab.generation import truncate_at_stop

        out = []
        for r in requests:
            p = self.by_prompt[r.prompt]
            raw = SOL[p.task_id]["correct" if p.language in self.good else "wrong"]
            out.append([Completion(truncate_at_stop(raw, r.stop), 9, "stop")])
        if on_batch is not None and out:
            on_batch(list(range(len(out))), out)
        return out, GenerationStats(backend="fake", n_prompts=len(requests), generated_tokens=9, wall_s=1.0)


def test_per_language_pass_at_1_and_average(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(runner_mod, "generate", KnownCompletions(good={"python", "java"}))
    ev = MultilingualCodeEval(name="babelcode", source=str(BC), limit=1, workers=2)
    res = ev.run(*tiny, RunContext(device="cpu", seed=0, output_dir=tmp_path / "run", run_fingerprint="x"))
    m = res.metrics
    assert (m["babelcode/python/pass@1"], m["babelcode/java/pass@1"]) == (1.0, 1.0)
    assert (m["babelcode/go/pass@1"], m["babelcode/cpp/pass@1"]) == (0.0, 0.0)
    assert m["babelcode/avg/pass@1"] == 0.5
    prov = res.provenance["babelcode/go/pass@1"]
    assert prov["language"] == "go" and prov["n_problems"] == 1
    assert prov["dataset"]["n_per_language"] == {"python": 3, "java": 2, "go": 2, "cpp": 3}
    assert {"\n}", "\n    }\n", "\nfunc"} <= set(prov["stop"])  # per-language stop words
    assert res.provenance["babelcode/avg/pass@1"]["languages"] == ["cpp", "go", "java", "python"]
    rows = {r["task_id"]: r for r in res.tables["babelcode_problems"]}
    assert rows["go/0"]["statuses"] == "failed" and rows["go/0"]["first_error"]


def test_language_and_format_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        MultilingualCodeEval(name="babelcode", languages=["rust"])
    assert e.value.key == "eval.babelcode.languages"
    with pytest.raises(ConfigError) as e:
        MultilingualCodeEval(name="babelcode", format="apps")
    assert e.value.key == "eval.babelcode.format"


def test_paper_table_2_shape():
    import pandas as pd

    df = pd.DataFrame([
        {"model": "m", "quantizer": "none", "format": None, "status": "ok", "babelcode/python/pass@1": 0.5,
         "babelcode/java/pass@1": 0.25, "babelcode/go/pass@1": 0.0, "babelcode/cpp/pass@1": 0.25,
         "babelcode/avg/pass@1": 0.25},
        {"model": "m", "quantizer": "rtn", "format": "w4g128", "status": "ok", "babelcode/python/pass@1": 0.25,
         "babelcode/java/pass@1": 0.0, "babelcode/go/pass@1": 0.0, "babelcode/cpp/pass@1": 0.25,
         "babelcode/avg/pass@1": 0.125},
        {"model": "m", "quantizer": "awq", "format": "w4g128", "status": "failed", "babelcode/python/pass@1": 0.9},
    ])
    (title, tab), = paper_tables(df)
    assert title.startswith("Table 2 shape: babelcode pass@1 on m")
    assert list(tab.columns) == ["method", "python", "java", "go", "cpp", "avg", "runs"]
    assert tab.set_index("method").loc["rtn w4g128", "avg"] == 0.125
    assert "awq w4g128" not in set(tab["method"])  # failed runs never fill a cell


def test_cli_babelcode_on_local_rows(tmp_path):
    args = ["+exp=demo_tiny", "quantizer=none", "eval=[babelcode]", f"eval.babelcode.source={BC}",
            "eval.babelcode.languages=[python,cpp]", "eval.babelcode.limit=1", "eval.babelcode.max_new_tokens=4",
            "eval.babelcode.workers=2", "hydra.mode=RUN"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next(Path(tmp_path / "results").rglob("result.json")).read_text())
    assert rec["status"] == "ok"
    # the untrained tiny model writes noise: nothing passes, every language is reported
    assert {k: v for k, v in rec["metrics"].items() if "pass@1" in k} == {
        "babelcode/python/pass@1": 0.0, "babelcode/cpp/pass@1": 0.0, "babelcode/avg/pass@1": 0.0}
    assert "Table 2 shape: babelcode pass@1" in proc.stdout


def test_cli_missing_source_is_one_clear_error(tmp_path):
    proc = run_cli(["+exp=demo_tiny", "quantizer=none", "eval=[babelcode]",
                    f"eval.babelcode.source={tmp_path / 'nope.jsonl'}", "hydra.mode=RUN"], tmp_path)
    assert proc.returncode != 0
    assert "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
