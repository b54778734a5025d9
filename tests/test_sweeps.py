"""Sweeps through the real CLI on the tiny model: a bad job does not end the sweep, a killed sweep resumes
without redoing finished jobs or duplicating rows, and a single-job command line is a run, not a sweep."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, run_cli

from quantlab.sweep import single_job_argv
from quantlab.tracking.report import gather


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json"))]


def test_a_bad_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # the audit's command: job 1 (group size 7 divides no layer) used to end the sweep before job 2
    args = ["-m", "+exp=demo_tiny", "quantizer=rtn", "quantizer.format.group_size=64,7,32", "eval=[ppl_local]"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    recs = {Path(r["output_dir"]).name: r for r in _records(tmp_path / "results")}
    assert {k: r["status"] for k, r in recs.items()} == {"0": "ok", "1": "failed", "2": "ok"}
    assert recs["2"]["format"]["group_size"] == 32 and recs["2"]["metrics"]["ppl/local_stdlib"] > 1
    # one summary at the end: every failed job with its one-line error
    summary = proc.stderr[proc.stderr.index("job(s) of the sweep"):]
    assert "1 job(s) of the sweep" in proc.stderr and recs["1"]["output_dir"] in summary
    assert "quantizer.format.group_size: 7 does not divide" in summary
    assert "Traceback" not in proc.stderr


def test_a_crashing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # not a quantlab user error: transformers itself raises (64 hidden units, 3 heads) in job 0
    args = ["-m", "+exp=demo_tiny", "quantizer=rtn", "eval=[ppl_local]", "model.tiny.num_attention_heads=3,4"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    recs = {Path(r["output_dir"]).name: r for r in _records(tmp_path / "results")}
    assert {k: r["status"] for k, r in recs.items()} == {"0": "failed", "1": "ok"}
    assert "not a multiple of the number of attention heads" in recs["0"]["error"]["message"]
    assert "Traceback" in recs["0"]["error"]["traceback"]  # a crash keeps its traceback in the record
    assert "job 0 crashed" in proc.stderr and "1 job(s) of the sweep" in proc.stderr


def _sweep_cmd(tmp_path: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "QUANTLAB_RESULTS": str(tmp_path / "results"), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "quantlab", "-m", "+exp=demo_tiny", "quantizer=none,rtn,gptq",
            "eval=[ppl_local]"]
    return args, env


def test_kill_9_then_the_same_command_finishes_the_sweep_once(tmp_path):
    args, env = _sweep_cmd(tmp_path)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    results = tmp_path / "results"
    deadline = time.monotonic() + 240
    try:  # kill -9 while job 1 runs: after it wrote variant.json, before its result.json
        while time.monotonic() < deadline:
            started = list(results.glob("sweeps/*/*/1/variant.json"))
            if started and not (started[0].parent / "result.json").exists():
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = _records(results)
    assert [r["status"] for r in first] == ["ok"]  # job 0 finished, job 1 was killed mid-run

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "job 0 skipped" in again.stderr and "job 1 skipped" not in again.stderr
    recs = _records(results)
    by_status = {}
    for r in recs:
        by_status.setdefault(r["status"], []).append(r)
    # job 0 was done once (its only ok record is the first sweep's), jobs 1 and 2 once each in the second
    assert len(by_status["ok"]) == 3 and len(by_status["skipped"]) == 1
    assert len({(r["variant"]["id"], r["seed"]) for r in by_status["ok"]}) == 3
    assert by_status["skipped"][0]["error"]["existing"] == first[0]["output_dir"]
    # the report: one row per job; the killed run and the skip are in the footer, not in the tables
    rows, resolved = gather(results)
    assert sorted(r.quantizer["name"] for r in rows) == ["gptq", "none", "rtn"] and all(r.status == "ok" for r in rows)
    footer = {r.status for r, _ in resolved.superseded}
    assert footer == {"incomplete", "skipped"}


def test_rerun_true_runs_a_done_job_again_and_the_newest_wins(tmp_path):
    args = ["-m", "+exp=demo_tiny", "quantizer=rtn", "eval=[ppl_local]"]  # a one-job sweep
    assert run_cli(args, tmp_path).returncode == 0
    proc = run_cli([*args, "rerun=true"], tmp_path)
    assert proc.returncode == 0 and "skipped" not in proc.stderr
    recs = sorted(_records(tmp_path / "results"), key=lambda r: r["started_at"])
    assert [r["status"] for r in recs] == ["ok", "ok"] and recs[0]["variant"]["id"] == recs[1]["variant"]["id"]
    rows, resolved = gather(tmp_path / "results")
    assert [r.run_id for r in rows] == [recs[1]["run_id"]]  # the newest wins, the older one is in the footer
    assert [r.run_id for r, _ in resolved.superseded] == [recs[0]["run_id"]]


def test_a_single_job_command_line_is_a_run(tmp_path):
    proc = run_cli(["+exp=demo_tiny", "quantizer=rtn", "eval=[ppl_local]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = _records(tmp_path / "results")
    assert Path(rec["output_dir"]).relative_to(tmp_path / "results").parts[:2] == ("runs", "demo_tiny")
    assert not (tmp_path / "results" / "sweeps").exists()


@pytest.mark.parametrize("argv, single", [
    (["quantizer=gptq"], True),                                  # the primary config sweeps quantizer only
    (["quantizer=gptq", "seed=3"], True),
    ([], False),                                                 # the demo: none,rtn
    (["seed=1"], False),
    (["quantizer=none,rtn"], False),
    (["-m", "quantizer=gptq"], False),                           # asked for a sweep
    (["+exp=sqplus_smollm2"], False),                            # the preset's five methods
    (["+exp=sqplus_smollm2", "quantizer=awq"], True),
    (["quantizer=nope"], False),                                 # a bad override: Hydra reports it
    (["quantizer=gptq", "hydra.mode=MULTIRUN"], False),          # asked for a sweep explicitly
])
def test_single_job_argv(argv, single):
    assert single_job_argv(argv, str(CONF)) is single
