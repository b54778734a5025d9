"""Parallel sweeps through Hydra's launcher plugins (submitit, joblib): same records, same report, a failing
job does not stop the others; the SLURM presets compose (no cluster here to run them)."""
from __future__ import annotations

import json

import pytest
from conftest import compose, run_cli

SWEEP = ["-m", "+exp=demo_tiny", "quantizer=rtn", "quantizer.format.bits=4,3,9,2", "eval=[ppl_local]"]


def _records(root):
    return {r["overrides"][-2]: r for r in (json.loads(p.read_text()) for p in root.rglob("result.json"))}


def _check(r, tmp_path):
    assert r.returncode == 1, r.stderr[-2000:]  # one job failed: the sweep ends with exit 1, after all jobs
    recs = _records(tmp_path / "results")
    assert {k: v["status"] for k, v in recs.items()} == {
        "quantizer.format.bits=4": "ok", "quantizer.format.bits=3": "ok", "quantizer.format.bits=2": "ok",
        "quantizer.format.bits=9": "failed"}
    assert "quantizer.format.bits" in recs["quantizer.format.bits=9"]["error"]["message"]
    assert "1 job(s) of the sweep" in r.stderr
    for b in (4, 3, 2):  # each job ran its own setting and was evaluated
        rec = recs[f"quantizer.format.bits={b}"]
        assert rec["format"]["bits"] == b and rec["metrics"]["ppl/local_stdlib"] > 1


def test_submitit_local_sweep_records_every_job_and_survives_a_failure(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = run_cli([*SWEEP, "hydra/launcher=submitit_local"], tmp_path)
    _check(r, tmp_path)
    assert list((tmp_path / "results" / "sweeps").rglob(".submitit"))  # the jobs really went through submitit


@pytest.mark.slow
def test_joblib_sweep_records_every_job_and_survives_a_failure(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _check(run_cli([*SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path), tmp_path)


@pytest.mark.parametrize("size,gpus", [("7b", 1), ("13b", 1), ("34b", 2), ("70b", 4)])
def test_slurm_presets_compose(size, gpus):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from conftest import CONF
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher=slurm_{size}",
                                                            "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == gpus
    assert launcher.partition == "gpu" and launcher.timeout_min > 0 and launcher.array_parallelism > 0
    assert compose([]).experiment == "demo"  # the presets touch nothing outside hydra.launcher
