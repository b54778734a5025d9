"""The pipeline in-process: deterministic records, failures recorded as failures."""
from __future__ import annotations

import json

import pytest
from conftest import compose

from quantlab.cli import run
from quantlab.errors import ConfigError


def test_same_config_same_numbers(tmp_path):
    cfg = compose(["+exp=demo_tiny", "quantizer=rtn", "eval.ppl_local.max_windows=4"])
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    assert a.status == b.status == "ok"
    assert a.metrics == b.metrics and a.calib["sha256"] == b.calib["sha256"]
    assert a.provenance["ppl/local_stdlib"]["text_sha256"] == b.provenance["ppl/local_stdlib"]["text_sha256"]
    on_disk = json.loads((tmp_path / "a" / "result.json").read_text())
    assert on_disk["metrics"] == a.metrics and on_disk["schema_version"] == 1
    assert (tmp_path / "a" / "layer_diagnostics.csv").is_file()


def test_failed_run_is_recorded_as_failed(tmp_path):
    cfg = compose(["+exp=demo_tiny", "quantizer=rtn", "quantizer.format.group_size=48"])
    with pytest.raises(ConfigError, match="quantizer.format.group_size"):
        run(cfg, tmp_path)
    rec = json.loads((tmp_path / "result.json").read_text())
    assert rec["status"] == "failed" and rec["metrics"] == {}
    assert "does not divide in_features=64" in rec["error"]["message"]
    assert rec["model"]["name"] == "tiny_llama"  # what was known before the failure is kept


def test_seed_changes_random_calibration(tmp_path):
    a = run(compose(["+exp=demo_tiny", "quantizer=rtn", "eval=[layer_error]"]), tmp_path / "a")
    b = run(compose(["+exp=demo_tiny", "quantizer=rtn", "eval=[layer_error]", "calib.seed=1"]), tmp_path / "b")
    assert a.calib["sha256"] != b.calib["sha256"]
    assert a.metrics["layer/mean_rel_weight_error"] == b.metrics["layer/mean_rel_weight_error"]  # RTN ignores data
