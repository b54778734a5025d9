"""Hydra config -> typed :class:`~quantlab.harness.RunSpec` -> run -> ``result.json``.

With :mod:`quantlab.run` this is the only module that sees OmegaConf/Hydra objects. Every run writes
exactly one record, atomically, whether it succeeded or failed; a failed run is never recorded as a
success.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from quantlab.calib.datasets import CalibConfig
from quantlab.deploy.config import DeployConfig
from quantlab.errors import ConfigError, find_quantlab_error
from quantlab.evals.base import Evaluator
from quantlab.harness import RunOutcome, RunSpec, execute
from quantlab.models.loaders import ModelConfig
from quantlab.quantizers.base import QuantizerConfig, quantizer_class
from quantlab.tracking.env import capture_env, peak_memory
from quantlab.tracking.record import RunRecord, new_run_id, utc_now_iso, write_json_atomic, write_record
from quantlab.tracking.variant import VARIANT_FILE, make_variant
from quantlab.tracking.wandb_logger import LoggerConfig, Tracker, make_tracker

log = logging.getLogger(__name__)

# importing these packages registers the built-in quantizers and evaluators
import quantlab.evals
import quantlab.quantizers  # noqa: F401


def _build(node: Any, key: str, expected: type) -> Any:
    """``instantiate`` one config node, unwrapping our own errors from Hydra's wrapper."""
    if node is None:
        return None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(
            key,
            "has no _target_: it was given values (e.g. by an exp preset or an override) but no config "
            "file of its group was selected",
        )
    try:
        obj = instantiate(node, _convert_="all")
    except Exception as e:  # Hydra wraps errors raised inside targets in InstantiationException
        inner = find_quantlab_error(e)
        if inner is not None:
            raise inner from None
        raise ConfigError(key, f"cannot build {node.get('_target_')}: {e}") from e
    if not isinstance(obj, expected):
        raise ConfigError(key, f"_target_ must build a {expected.__name__}, got {type(obj).__name__}")
    return obj


def build_spec(cfg: DictConfig) -> RunSpec:
    """Instantiate every config group into typed objects (fails early, before loading anything)."""
    evals: list[Evaluator] = []
    for name, node in (cfg.get("eval") or {}).items():
        ev = _build(node, f"eval.{name}", Evaluator)
        if not ev.name:
            object.__setattr__(ev, "name", str(name))
        evals.append(ev)
    return RunSpec(
        model=_build(cfg.model, "model", ModelConfig),
        quantizer=_build(cfg.quantizer, "quantizer", QuantizerConfig),
        calib=_build(cfg.get("calib"), "calib", CalibConfig),
        evals=tuple(evals),
        seed=int(cfg.get("seed", 0)),
        save_artifacts=bool(cfg.get("save_artifacts", True)),
        deploy=_build(cfg.get("deploy"), "deploy", DeployConfig) or DeployConfig(),
    )


def _fill(record: RunRecord, out: RunOutcome) -> None:
    record.model = out.model_info
    record.format = out.format
    record.bits_per_weight = out.bits_per_weight
    record.calib = out.calib
    record.metrics = out.metrics
    record.provenance = out.provenance
    record.per_item = out.per_item
    record.quant_summary = out.quant_summary
    record.quant_time_s = out.quant_time_s
    record.peak_memory = out.peak_memory


def run(
    cfg: DictConfig, output_dir: Path, overrides: list[str] | None = None, choices: dict[str, Any] | None = None
) -> RunRecord:
    """Run the experiment ``cfg`` and write ``output_dir/result.json``.

    Args:
        cfg: the composed config.
        output_dir: the run directory.
        overrides: command-line overrides (recorded).
        choices: Hydra's config-group choices (recorded; names the quantizer even if building it fails).

    Raises whatever the run raised, after recording ``status=failed`` with the error.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    choices = dict(choices or {})
    record = RunRecord(
        run_id=new_run_id(),
        status="failed",
        experiment=str(cfg.get("experiment", "default")),
        output_dir=str(output_dir),
        started_at=utc_now_iso(),
        overrides=list(overrides or []),
        tags=[str(t) for t in cfg.get("tags") or []],
        seed=int(cfg.get("seed", 0)),
        quantizer={"name": str(choices.get("quantizer") or ""), "choices": choices},
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_json_atomic(output_dir / "config_resolved.json", resolved)
    tracker: Tracker = Tracker()
    out = RunOutcome()
    try:
        spec = build_spec(cfg)
        record.quantizer["config"] = spec.quantizer.to_dict()
        record.variant = make_variant(spec)
        write_json_atomic(output_dir / VARIANT_FILE, record.variant)  # an interrupted run still names its variant
        logger_cfg = _build(cfg.get("logger"), "logger", LoggerConfig) or LoggerConfig()
        tracker = make_tracker(logger_cfg)
        record.quantizer["name"] = quantizer_class(spec.quantizer).name
        tracker.start(
            run_id=record.run_id,
            experiment=record.experiment,
            quantizer=record.quantizer["name"],
            config=resolved,
            output_dir=output_dir,
            tags=record.tags,
        )
        execute(spec, output_dir, out)
        _fill(record, out)
        record.status = "ok"
    except BaseException as e:
        _fill(record, out)
        user_err = find_quantlab_error(e)
        record.error = {
            "type": type(user_err or e).__name__,
            "message": str(user_err or e) or type(e).__name__,
            "traceback": traceback.format_exc(),
        }
        if not record.peak_memory:
            record.peak_memory = peak_memory()
        raise
    finally:
        record.env = capture_env(record.model.get("device"))
        record.finished_at = utc_now_iso()
        record.wall_s = round(time.perf_counter() - t0, 3)
        write_record(record, output_dir)
        try:
            tracker.log_result(record, out.tables, out.images)
            tracker.finish(record.status == "ok")
        except Exception:  # tracking must never turn a finished run into a failure
            log.exception("experiment tracker failed")
    log.info("run %s: %s -> %s", record.run_id, record.status, output_dir / "result.json")
    return record
