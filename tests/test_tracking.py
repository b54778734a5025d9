"""Run records, atomic writers, environment capture and the W&B tracker."""
from __future__ import annotations

import csv
import json
import logging
import re
import resource
import shutil
import socket
import struct
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from quantlab.errors import ConfigError, DataError
from quantlab.formats.spec import QuantFormat
from quantlab.tracking.env import capture_env, git_info, peak_memory, reset_peak_cuda
from quantlab.tracking.record import (
    SCHEMA_VERSION,
    RunRecord,
    new_run_id,
    read_record,
    utc_now_iso,
    write_json_atomic,
    write_record,
    write_table,
)
from quantlab.tracking.wandb_logger import LoggerConfig, Tracker, WandbTracker, make_tracker

REPO = Path(__file__).resolve().parents[1]


def make_record(**overrides) -> RunRecord:
    fmt = QuantFormat(bits=4, group_size=128, symmetric=False)
    kw = {
        "run_id": "20260101-120000-abc123",
        "status": "ok",
        "experiment": "w4_methods",
        "output_dir": "/results/runs/x",
        "started_at": "2026-01-01T12:00:00.000+00:00",
        "finished_at": "2026-01-01T12:01:00.000+00:00",
        "wall_s": 60.5,
        "model": {"name": "tiny-llama", "revision": "abc", "dtype": "float32", "device": "cpu", "n_params": 1000},
        "quantizer": {"name": "rtn", "config": {"include": ["*"], "exclude": ["lm_head"]}},
        "format": {**fmt.to_dict(), "short_name": fmt.short_name()},
        "bits_per_weight": fmt.bits_per_weight(),
        "calib": {"name": "random", "n_samples": 8, "seqlen": 64, "seed": 0, "sha256": "f" * 64},
        "metrics": {"ppl/local_stdlib": 12.345678, "err/layer_mean_sqnr_db": 20.5},
        "provenance": {"ppl/local_stdlib": {"protocol": "gptq_nonoverlap", "seqlen": 64}},
        "quant_summary": {"n_layers": 14},
        "quant_time_s": 1.25,
        "peak_memory": {"peak_rss_gb": 1.5, "peak_cuda_gb": None},
        "env": {"torch": "2.13.0", "packages": {"transformers": "5.23.0"}, "git_sha": "a" * 40, "git_dirty": False},
        "overrides": ["quantizer=rtn", "seed=1"],
        "tags": ["smoke"],
        "seed": 1,
    }
    kw.update(overrides)
    return RunRecord(**kw)


# ----------------------------------------------------------------------------- record


def test_record_round_trip_dict_and_file(tmp_path):
    rec = make_record()
    assert RunRecord.from_dict(rec.to_dict()) == rec
    path = write_record(rec, tmp_path)
    assert path == tmp_path / "result.json"
    assert read_record(path) == rec
    assert read_record(tmp_path) == rec  # a run dir works too
    on_disk = json.loads(path.read_text())
    assert list(on_disk)[:5] == ["run_id", "status", "experiment", "output_dir", "started_at"]
    assert on_disk["schema_version"] == SCHEMA_VERSION == 1


def test_from_dict_ignores_unknown_keys_with_warning(caplog):
    d = make_record().to_dict() | {"future_field": 1, "schema_version": 2}
    with caplog.at_level(logging.WARNING):
        rec = RunRecord.from_dict(d)
    assert rec.run_id == "20260101-120000-abc123" and rec.schema_version == 2
    assert "future_field" in caplog.text


def test_from_dict_missing_required_key_raises():
    d = make_record().to_dict()
    del d["started_at"]
    with pytest.raises(DataError, match="started_at"):
        RunRecord.from_dict(d)


def test_new_run_id_and_utc_now():
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50
    for rid in ids:
        assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", rid)
    now = datetime.fromisoformat(utc_now_iso())
    assert now.utcoffset() == timedelta(0)


def test_flat_row():
    row = make_record().flat()
    assert row["experiment"] == "w4_methods"
    assert row["model"] == "tiny-llama"
    assert row["quantizer"] == "rtn"
    assert row["format"] == "w4g128a"
    assert row["bits_per_weight"] == 4 + (16 + 4) / 128
    assert row["ppl/local_stdlib"] == 12.345678
    assert row["err/layer_mean_sqnr_db"] == 20.5
    assert row["calib.name"] == "random" and row["calib.n_samples"] == 8 and row["calib.seqlen"] == 64
    assert row["calib.seed"] == 0 and row["calib.sha256"] == "f" * 64
    assert row["git_sha"] == "a" * 40 and row["git_dirty"] is False
    assert row["torch"] == "2.13.0" and row["transformers"] == "5.23.0"
    assert row["quant_time_s"] == 1.25 and row["wall_s"] == 60.5 and row["peak_rss_gb"] == 1.5
    assert row["seed"] == 1 and row["error"] is None and row["output_dir"] == "/results/runs/x"
    assert row["overrides"] == "quantizer=rtn seed=1" and row["tags"] == "smoke"
    # only metric keys contain "/" (the report's default metric selection relies on it)
    assert sorted(k for k in row if "/" in k) == ["err/layer_mean_sqnr_db", "ppl/local_stdlib"]
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in row.values())


def test_flat_format_of_baseline_and_failed_run():
    base = make_record(quantizer={"name": "none", "config": {}}, format=None, bits_per_weight=None, calib=None)
    assert base.flat()["format"] == "fp"
    assert base.flat()["calib.name"] is None
    failed = make_record(status="failed", format=None, metrics={},
                         error={"type": "ConfigError", "message": "bad group_size", "traceback": "tb"})
    assert failed.flat()["format"] is None  # a failed rtn run is not mislabelled as full precision
    assert failed.flat()["error"] == "bad group_size"


# ----------------------------------------------------------------------------- atomic writes


def test_write_json_atomic_converts_types_and_leaves_no_temp(tmp_path):
    fmt = QuantFormat(bits=3)
    obj = {"p": tmp_path / "a", "t": (1, 2), "f32": np.float32(0.5), "i64": np.int64(7),
           "tt": torch.tensor(2.5), "arr": np.arange(3), "fmt": fmt}
    path = tmp_path / "x.json"
    write_json_atomic(path, obj)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    back = json.loads(path.read_text())
    assert back == {"p": str(tmp_path / "a"), "t": [1, 2], "f32": 0.5, "i64": 7, "tt": 2.5,
                    "arr": [0, 1, 2], "fmt": fmt.to_dict()}


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})
    before = path.read_bytes()
    # json.dump streams "{", "a": 2, "big": ... to the temp file before it reaches the object.
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"a": 2, "big": "x" * 100_000, "bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_write_json_atomic_non_finite_become_null_with_warning(tmp_path, caplog):
    path = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING):
        write_json_atomic(path, {"metrics": {"ppl/a": float("nan"), "ppl/b": float("inf"), "ok": 1.0},
                                 "x": [np.float32("nan")]})
    assert json.loads(path.read_text()) == {"metrics": {"ppl/a": None, "ppl/b": None, "ok": 1.0}, "x": [None]}
    assert "metrics.ppl/a" in caplog.text and "metrics.ppl/b" in caplog.text


def test_write_table_csv_and_json(tmp_path):
    rows = [{"layer": "l0.q_proj", "mse": 0.1, "sqnr_db": 20.0},
            {"layer": "l0.k_proj", "mse": float("nan"), "note": "x|y", "shape": [2, 3]}]
    paths = write_table(rows, tmp_path, "layer_error")
    assert paths == [tmp_path / "layer_error.csv", tmp_path / "layer_error.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_error.csv", "layer_error.json"]
    with open(paths[0], newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["layer", "mse", "sqnr_db", "note", "shape"]
    assert got[1] == ["l0.q_proj", "0.1", "20.0", "", ""]
    assert got[2] == ["l0.k_proj", "nan", "", "x|y", "[2, 3]"]
    back = json.loads(paths[1].read_text())
    assert back[0] == rows[0] and back[1]["mse"] is None and back[1]["shape"] == [2, 3]


def test_write_table_rejects_paths(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        write_table([{"a": 1}], tmp_path, "../escape")


# ----------------------------------------------------------------------------- env


def test_capture_env_has_versions_and_git_keys():
    env = capture_env("cpu")
    assert env["torch"] == torch.__version__
    assert env["torch_num_threads"] == torch.get_num_threads()
    assert env["device"] == "cpu"
    assert env["packages"]["hydra-core"] is not None and env["packages"]["numpy"] == np.__version__
    assert "lm-eval" in env["packages"] and "bitsandbytes" in env["packages"]
    assert {"git_sha", "git_dirty", "quantlab", "cuda", "gpu_name", "cpu", "cpu_count", "cpu_capability"} <= set(env)
    if not torch.cuda.is_available():
        assert env["gpu_name"] is None
    assert env == json.loads(json.dumps(env))  # JSON-native
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in json.dumps(env)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_info_on_a_real_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_info(tmp_path) == {"git_sha": None, "git_dirty": None}  # not a checkout
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "venv" / "pkg").mkdir(parents=True)
    (repo / ".gitignore").write_text("venv/\n")
    (repo / "pkg" / "a.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
                               "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, text=True)

    git("init", "-q")
    assert git_info(repo / "pkg") == {"git_sha": None, "git_dirty": True}  # no commit yet
    git("add", ".")
    git("commit", "-q", "-m", "init")
    sha = git("rev-parse", "HEAD").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert git_info(repo / "pkg") == {"git_sha": sha, "git_dirty": False}
    (repo / "pkg" / "new.py").write_text("y = 2\n")  # untracked source counts as dirty
    assert git_info(repo / "pkg") == {"git_sha": sha, "git_dirty": True}
    assert git_info(repo / "venv" / "pkg") == {"git_sha": None, "git_dirty": None}  # ignored dir


def test_peak_memory_reports_process_rss():
    reset_peak_cuda()
    mem = peak_memory()
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB -> GiB
    assert mem["peak_rss_gb"] == pytest.approx(expected, rel=0.05)
    assert 0.01 < mem["peak_rss_gb"] < 1024
    if not torch.cuda.is_available():
        assert mem["peak_cuda_gb"] is None


# ----------------------------------------------------------------------------- logger config


def test_logger_config_validation_and_yaml():
    with pytest.raises(ConfigError) as exc:
        LoggerConfig(kind="mlflow")
    assert exc.value.key == "logger.kind"
    with pytest.raises(ConfigError) as exc:
        LoggerConfig(kind="wandb", mode="shared")
    assert exc.value.key == "logger.mode"
    with pytest.raises(ConfigError) as exc:
        LoggerConfig(tags=[1])
    assert exc.value.key == "logger.tags"
    assert LoggerConfig(tags=["a", "b"]).tags == ("a", "b")
    none = instantiate(OmegaConf.load(REPO / "conf/logger/none.yaml"))
    wb = instantiate(OmegaConf.load(REPO / "conf/logger/wandb.yaml"))
    assert none == LoggerConfig()
    assert wb == LoggerConfig(kind="wandb", project="quantlab", mode="offline")
    assert type(make_tracker(none)) is Tracker
    assert isinstance(make_tracker(wb), WandbTracker)


def test_noop_tracker_accepts_calls(tmp_path):
    t = make_tracker(LoggerConfig())
    t.start(run_id="r", experiment="e", quantizer="rtn", config={}, output_dir=tmp_path, tags=[])
    t.log_result(make_record(), {"t": [{"a": 1}]})
    t.finish(ok=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- W&B offline

def _wandb_records(path: Path):
    """Decode a W&B transaction log (``run-*.wandb``): a LevelDB-style log of protobuf Records.

    Layout: 7-byte file header ``:W&B`` + magic + version; then 32 KiB blocks of chunks, each
    ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)`` + payload.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_tracker_offline_writes_summary_table_and_exit_code(tmp_path):
    pytest.importorskip("wandb")
    tracker = make_tracker(LoggerConfig(kind="wandb", mode="offline", dir=str(tmp_path), tags=("ci",)))
    rec_ok = make_record(run_id="20260101-120000-aaaaaa")
    tracker.start(run_id=rec_ok.run_id, experiment="w4_methods", quantizer="rtn",
                  config={"seed": 1, "quantizer": {"format": {"bits": 4}}}, output_dir=tmp_path / "unused",
                  tags=["smoke"])
    tracker.log_result(rec_ok, {"layer_error": [{"layer": "l0", "mse": 0.1}, {"layer": "l1", "mse": None}],
                                "qat_loss_curve": [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.0, "lr": 0.0}]})
    tracker.finish(ok=True)
    tracker.finish(ok=True)  # idempotent
    rec_bad = make_record(run_id="20260101-120001-bbbbbb", status="failed", metrics={})
    tracker.start(run_id=rec_bad.run_id, experiment="w4_methods", quantizer="rtn", config={},
                  output_dir=tmp_path, tags=[])
    tracker.log_result(rec_bad, {})
    tracker.finish(ok=False)

    runs = {}
    for rid in (rec_ok.run_id, rec_bad.run_id):
        (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{rid}")
        runs[rid] = list(_wandb_records(run_dir / f"run-{rid}.wandb"))
    assert not (tmp_path / "unused").exists()  # logger.dir wins over the run dir

    recs = runs[rec_ok.run_id]
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.run_id == rec_ok.run_id and run.display_name == rec_ok.run_id
    assert run.run_group == "w4_methods" and run.job_type == "rtn" and list(run.tags) == ["ci", "smoke"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["seed"] == 1 and config["quantizer"] == {"format": {"bits": 4}}
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for u in r.summary.update:
                summary[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    assert summary["ppl/local_stdlib"] == 12.345678
    assert summary["format"] == "w4g128a" and summary["run_id"] == rec_ok.run_id
    assert summary["table/layer_error/_type"] == "table-file"
    (table_file,) = (tmp_path / "wandb").glob(f"offline-run-*-{rec_ok.run_id}/files/media/table/**/*layer_error*.table.json")
    assert json.loads(table_file.read_text()) == {"columns": ["layer", "mse"], "data": [["l0", 0.1], ["l1", None]]}
    curve = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            item = {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in r.history.item}
            if "qat_loss_curve/loss" in item:
                curve.append((item["_step"], item["qat_loss_curve/loss"], item["qat_loss_curve/lr"]))
    assert curve == [(1, 2.5, 1e-4), (2, 2.0, 0.0)]  # a line chart per step, not just the table
    exits = {rid: [r.exit.exit_code for r in rs if r.WhichOneof("record_type") == "exit"] for rid, rs in runs.items()}
    assert exits == {rec_ok.run_id: [0], rec_bad.run_id: [1]}


def test_rss_sampler_sees_an_allocation_during_the_step():
    import time

    import torch

    from quantlab.tracking.rss import RssSampler, rss_now

    with RssSampler(interval=0.005) as s:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written
        time.sleep(0.05)  # several samples while it is held
        del x
    out = s.summary()
    assert out["peak_rss_gb"] - out["start_rss_gb"] >= 60 / 1024  # >= 60 of the 64 MiB seen
    assert out["n_samples"] >= 2 and out["interval_s"] == 0.005
    assert rss_now()["rss"] > 0
