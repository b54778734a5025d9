"""End to end through the real CLI (`python -m quantlab`) on the tiny model, in a temp dir."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONF, run_cli

QUANTIZERS = sorted(p.stem for p in (CONF / "quantizer").glob("*.yaml") if not p.stem.startswith("_"))  # _base: a fragment
#: LLM-QAT budget variants (llm_qat_cpu, llm_qat_paper): run with a shrunken budget in their own test
QAT_BUDGETS = [q for q in QUANTIZERS if q.startswith("llm_qat_")]


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def test_demo_tiny_runs_baseline_and_rtn(tmp_path):
    proc = run_cli(["+exp=demo_tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "results")
    assert sorted(r["quantizer"]["name"] for r in recs) == ["none", "rtn"]
    by = {r["quantizer"]["name"]: r for r in recs}
    for r in recs:
        assert r["status"] == "ok" and r["experiment"] == "demo_tiny"
        prov = r["provenance"]["ppl/local_stdlib"]
        assert prov["ppl_protocol"] == "gptq_nonoverlap" and prov["seqlen"] == 512
        assert r["env"]["torch"] and r["env"]["packages"]["transformers"] and "git_sha" in r["env"]
    assert by["none"]["format"] is None and by["none"]["bits_per_weight"] is None
    assert by["rtn"]["format"]["group_size"] == 64
    assert by["rtn"]["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 64)
    # quantization changes the model, so perplexity must differ from the baseline
    assert by["rtn"]["metrics"]["ppl/local_stdlib"] != by["none"]["metrics"]["ppl/local_stdlib"]
    assert by["rtn"]["metrics"]["layer/mean_output_sqnr_db"] > 0
    # the printed table names both methods
    assert "rtn" in proc.stdout and "none" in proc.stdout


@pytest.mark.slow  # a 4-job subprocess sweep; one record per job is also checked by every sweep test of
# test_sweeps.py and test_every_quantizer_runs_end_to_end in the default suite
def test_multirun_writes_one_record_per_job(tmp_path):
    args = ["-m", "+exp=demo_tiny", "quantizer=none,rtn", "quantizer.format.group_size=32,64", "eval=[ppl_local]"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "results")
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    got = sorted((r["quantizer"]["name"], (r["format"] or {}).get("group_size")) for r in recs)
    assert got == [("none", None), ("none", None), ("rtn", 32), ("rtn", 64)]
    assert len({r["output_dir"] for r in recs}) == 4


def test_every_quantizer_runs_end_to_end(tmp_path):
    """One multirun over every conf/quantizer/*.yaml on the tiny model (new methods are covered automatically)."""
    names = [q for q in QUANTIZERS if q not in QAT_BUDGETS]
    proc = run_cli(["-m", "+exp=demo_tiny", f"quantizer={','.join(names)}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "results")
    assert sorted(r["quantizer"]["choices"]["quantizer"] for r in recs) == names
    for r in recs:
        assert r["status"] == "ok", r["error"]
        assert r["metrics"]["ppl/local_stdlib"] > 1 and r["quant_time_s"] is not None


def test_qat_budget_presets_run_with_a_shrunken_budget(tmp_path):
    """The paper's budget (96k x 2048 tokens) cannot run here: same YAMLs, budget overridden to a few steps."""
    shrink = ["quantizer.data.n_sequences=6", "quantizer.data.max_length=24", "quantizer.train.steps=2",
              "quantizer.train.seq_len=16", "quantizer.train.grad_accum=1", "quantizer.wakv=4-8-8"]
    for name in QAT_BUDGETS:  # one run each: Hydra checks a multirun's overrides against the default quantizer
        proc = run_cli(["+exp=demo_tiny", f"quantizer={name}", "hydra.mode=RUN", *shrink], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(tmp_path / "results")
    assert sorted(r["quantizer"]["choices"]["quantizer"] for r in recs) == QAT_BUDGETS
    for r in recs:
        assert r["status"] == "ok", r["error"]
        assert r["quant_summary"]["wakv"] == "4-8-8" and r["quant_summary"]["steps_done"] == 2
        assert r["quant_summary"]["method_label"] == "llm_qat w4pcs 4-8-8"
    precision = {r["quantizer"]["choices"]["quantizer"]: r["quantizer"]["config"]["train"]["precision"] for r in recs}
    assert precision == {"llm_qat_cpu": "fp32", "llm_qat_paper": "bf16"}  # bf16 autocast runs on CPU too


def test_hub_model_offline_is_one_clear_line(tmp_path):
    proc = run_cli(["+exp=demo_tiny", "quantizer=rtn", "model=llama2_7b", "model.device=cpu"], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "error:" in ln)
    assert "meta-llama/Llama-2-7b-hf" in line and "model.path=" in line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantizer=nope"], "quantizer/nope"),
        (["model=nope"], "model/nope"),
        (["quantizer.format.bits=0"], "quantizer.format.bits"),
        (["quantizer.format.group_size=48"], "quantizer.format.group_size"),
        (["model.path=/nonexistent/model_dir"], "model.path"),
        (["eval.ppl_local.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    ],
    ids=["unknown-quantizer", "unknown-model", "bits-0", "group-not-dividing", "missing-model-path", "missing-text"],
)
def test_bad_input_gives_one_clear_error(tmp_path, args, needle):
    proc = run_cli(["+exp=demo_tiny", "quantizer=rtn", *args], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for rec in _records(tmp_path / "results"):  # a failed run is recorded as failed, never ok
        assert rec["status"] == "failed" and needle.split("/")[-1] in rec["error"]["message"]


def test_unreadable_text_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"\xff\xfe\x00\x80 not utf-8 \xc3\x28")
    proc = run_cli(["+exp=demo_tiny", "quantizer=rtn", f"eval.ppl_local.path={bad}"], tmp_path)
    assert proc.returncode != 0 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
    recs = _records(tmp_path / "results")
    assert len(recs) == 1 and recs[0]["status"] == "failed"
