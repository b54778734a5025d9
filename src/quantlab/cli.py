"""``python -m quantlab`` / ``quantlab``: the Hydra edge, the only module that sees Hydra/OmegaConf objects.

It composes the config, turns it into a typed :class:`~quantlab.experiment.RunSpec` (:func:`build_spec`)
and hands it to the typed chain, :func:`quantlab.experiment.run`, which writes the run's one record.

With no arguments it runs the demo (SmolLM2-135M: fp baseline and RTN w4 g64, code perplexity) and
prints a results table. ``+exp=NAME`` picks a preset from ``conf/exp``; ``-m`` sweeps.

A command line that names one value for every swept key (``python -m quantlab quantizer=gptq``) is a
single run under ``results/runs/`` (:func:`quantlab.sweep.single_job_argv`). In a sweep, a failing job is
recorded as failed and the sweep goes on; a job whose experiment, variant and seed already have an ok
record is skipped (``rerun=true`` forces it); at the end the failed jobs are listed and the exit status
is 1. A single run that fails exits 2 (a user error, one line) or with Python's traceback (a bug).

Under ``torchrun`` (LLM-QAT with ``quantizer.train.parallel=ddp|fsdp``, :mod:`quantlab.qat.parallel`)
every process composes the same config; rank 0 is the run (its Hydra directory, log, record and
evaluation), ranks > 0 load the model and train with it, write into a temporary Hydra directory that
is removed at exit, log warnings only, and exit 0 once training is over. Sweeps are refused there.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from quantlab.errors import ConfigError, find_quantlab_error

log = logging.getLogger("quantlab")
CONFIG_NAME = "config"


def _wakv_w(wakv: Any, default: int) -> int:
    """``${wakv_w:${quantizer.wakv},4}``: the W of a W-A-KV setting (``default`` when it is null or W=16),
    so a preset that sweeps W-A-KV states in its own config that the format's bits follow W."""
    from quantlab.formats.wakv import WAKV

    if wakv is None or str(wakv) in ("", "None", "null"):
        return int(default)
    setting = WAKV.parse(str(wakv))
    return setting.w_bits if setting.quantizes_weights else int(default)


OmegaConf.register_new_resolver("wakv_w", _wakv_w, replace=True)


def _build(node: Any, key: str, expected: type) -> Any:
    """``instantiate`` one config node, unwrapping our own errors from Hydra's wrapper."""
    if node is None:
        return None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(key, "has no _target_: it was given values (e.g. by an exp preset or an override) but "
                          "no config file of its group was selected")
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


def build_spec(cfg: DictConfig):
    """Instantiate every config group into typed objects (fails early, before loading anything)."""
    import quantlab.evals
    import quantlab.quantizers  # noqa: F401  (registers the methods)
    from quantlab.calib.datasets import CalibConfig
    from quantlab.deploy.config import DeployConfig
    from quantlab.evals.base import Evaluator
    from quantlab.experiment import RunSpec
    from quantlab.models.loaders import ModelConfig
    from quantlab.quantizers.base import QuantizerConfig
    from quantlab.tracking.wandb_logger import LoggerConfig

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
        logger=_build(cfg.get("logger"), "logger", LoggerConfig) or LoggerConfig(),
    )


def run(cfg: DictConfig, output_dir: Path, overrides: list[str] | None = None,
        choices: dict[str, Any] | None = None):
    """Run the experiment ``cfg`` and write ``output_dir/result.json`` (:func:`quantlab.experiment.run`).

    Args:
        cfg: the composed config.
        output_dir: the run directory (``config_resolved.json`` is written there first).
        overrides: command-line overrides (recorded).
        choices: Hydra's config-group choices (recorded; names the quantizer even if building it fails).

    Raises whatever the run raised, after recording ``status=failed`` with the error.
    """
    from quantlab import experiment
    from quantlab.tracking.record import new_record, write_json_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    choices = dict(choices or {})
    record = new_record(output_dir, str(cfg.get("experiment", "default")), overrides=list(overrides or []),
                        tags=[str(t) for t in cfg.get("tags") or []], seed=int(cfg.get("seed", 0)),
                        quantizer={"name": str(choices.get("quantizer") or ""), "choices": choices})
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    write_json_atomic(output_dir / "config_resolved.json", resolved)
    return experiment.run(record, output_dir, lambda: build_spec(cfg), config=resolved)


def _config_dir() -> str:
    """Configs ship inside the wheel (``quantlab/conf``); an editable install reads the repo's ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parents[1] / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"quantlab configs not found next to {here} (broken install?)")


def _torchrun_error(cfg: DictConfig, sweeping: bool) -> str | None:
    """Under torchrun: why this command cannot run on several processes (None when it can)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if sweeping:
        return (f"torchrun started {world} processes for a sweep; run one job per torchrun "
                "(give every swept key one value, e.g. quantizer=llm_qat quantizer.wakv=4-8-4)")
    if OmegaConf.select(cfg, "quantizer.train.parallel", default=None) is None:
        method = HydraConfig.get().runtime.choices.get("quantizer")
        return (f"quantizer.train.parallel: torchrun started {world} processes, but only LLM-QAT trains on "
                f"several (quantizer={method}): run it without torchrun")
    for key in ("model.device_map", "model.offload"):
        if OmegaConf.select(cfg, key, default=None) is not None:
            return f"{key}: under torchrun each process holds the model on its own device: set it to null"
    return None


def _follow(cfg: DictConfig, output_dir: Path) -> None:
    """Rank > 0 of a torchrun launch: the same run, without evaluations, exports or a record (rank 0 has
    them); returns when the LLM-QAT quantizer says this rank's training is over."""
    import dataclasses

    from quantlab.deploy.config import DeployConfig
    from quantlab.experiment import execute
    from quantlab.qat.parallel import FollowerDone
    from quantlab.tracking.record import new_record

    logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs the run
    spec = dataclasses.replace(build_spec(cfg), evals=(), save_artifacts=False, deploy=DeployConfig())
    try:
        execute(spec, output_dir, new_record(output_dir))
    except FollowerDone:
        return
    raise RuntimeError("a torchrun rank > 0 finished a run without distributed training")


def _skip_if_done(cfg: DictConfig, output_dir: Path, overrides: list[str]) -> bool:
    """Sweep job: skip it when its experiment, variant and seed already have an ok record (not ``rerun``)."""
    from quantlab.sweep import find_existing, record_skip
    from quantlab.tracking.variant import make_variant
    from quantlab.utils.paths import results_root

    if cfg.get("rerun", False):
        return False
    try:
        variant = make_variant(build_spec(cfg))
    except Exception:  # noqa: BLE001 (a config error: the run records it as a failure)
        return False
    experiment, seed = str(cfg.get("experiment", "default")), int(cfg.get("seed", 0))
    existing = find_existing(results_root(), experiment, variant["id"], seed, exclude=output_dir)
    if existing is None:
        return False
    record_skip(output_dir, experiment, seed, variant, existing, overrides)
    log.info("job %s skipped: variant %s seed %d already has an ok record in %s (rerun=true runs it again)",
             HydraConfig.get().job.num, variant["id"], seed, existing)
    return True


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    choices = cast(dict[str, Any], OmegaConf.to_container(hc.runtime.choices))
    output_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    follower = world > 1 and int(os.environ.get("RANK", "0")) > 0  # torchrun rank > 0: module docstring
    problem = _torchrun_error(cfg, sweeping) if world > 1 else None
    if problem:
        if not follower:  # every rank finds it, rank 0 says it
            log.error("error: %s", problem)
        sys.exit(2)
    if sweeping and _skip_if_done(cfg, output_dir, overrides):
        return None
    try:
        if follower:
            _follow(cfg, output_dir)
            return None
        record = run(cfg, output_dir, overrides, choices)
    except Exception as e:
        err = find_quantlab_error(e)
        if sweeping:  # recorded as failed by run(); the other jobs go on, the summary lists it
            if err is None:
                log.exception("job %s crashed (recorded as failed; the sweep goes on)", hc.job.num)
            else:
                log.error("job %s failed: %s", hc.job.num, err)
            return None
        if err is None:
            raise  # a bug: Hydra prints the traceback (set HYDRA_FULL_ERROR=1 for all frames)
        if not follower:  # a user error (a config value) is the same on every rank: rank 0 says it
            log.error("error: %s", err)
        sys.exit(2)
    first = next(iter(record.metrics.values()), None)
    return first  # lets Hydra sweepers (e.g. optuna) optimise the first metric


def main() -> None:
    """Console-script entry (``quantlab ...``), same as ``python -m quantlab``."""
    from quantlab.sweep import single_job_argv
    from quantlab.tracking import callbacks

    if single_job_argv(sys.argv[1:], _config_dir(), CONFIG_NAME):
        sys.argv.append("hydra.mode=RUN")
    scratch = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: see the module docstring
        from quantlab.qat.parallel import bind_local_device

        bind_local_device()
        if int(os.environ.get("RANK", "0")) > 0:
            scratch = tempfile.mkdtemp(prefix=f"quantlab-rank{os.environ['RANK']}-")
            sys.argv += [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]
    try:
        _hydra_main()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if callbacks.SWEEP_FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
