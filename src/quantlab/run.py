"""``python -m quantlab`` / ``quantlab``: the Hydra entry point.

With no arguments it runs the demo (SmolLM2-135M: fp baseline and RTN w4 g64, code perplexity) and
prints a results table. ``+exp=NAME`` picks a preset from ``conf/exp``; ``-m`` sweeps.

A command line that names one value for every swept key (``python -m quantlab quantizer=gptq``) is a
single run under ``results/runs/`` (:func:`quantlab.sweep.single_job_argv`). In a sweep, a failing job is
recorded as failed and the sweep goes on; a job whose experiment, variant and seed already have an ok
record is skipped (``rerun=true`` forces it); at the end the failed jobs are listed and the exit status
is 1. A single run that fails exits 2 (a user error, one line) or with Python's traceback (a bug).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from quantlab.errors import find_quantlab_error

log = logging.getLogger("quantlab")
CONFIG_NAME = "config"


def _config_dir() -> str:
    """Configs ship inside the wheel (``quantlab/conf``); an editable install reads the repo's ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parents[1] / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"quantlab configs not found next to {here} (broken install?)")


def _skip_if_done(cfg: DictConfig, output_dir: Path, overrides: list[str]) -> bool:
    """Sweep job: skip it when its experiment, variant and seed already have an ok record (not ``rerun``)."""
    from quantlab.pipeline import build_spec
    from quantlab.sweep import find_existing, record_skip
    from quantlab.tracking.variant import make_variant
    from quantlab.utils.paths import results_root

    if cfg.get("rerun", False):
        return False
    try:
        variant = make_variant(build_spec(cfg))
    except Exception:  # a config error: the run records it as a failure
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
    from quantlab.pipeline import run

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    choices = OmegaConf.to_container(hc.runtime.choices)
    output_dir, overrides = Path(hc.runtime.output_dir), list(hc.overrides.task)
    if sweeping and _skip_if_done(cfg, output_dir, overrides):
        return None
    try:
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
    _hydra_main()
    if callbacks.SWEEP_FAILURES:
        sys.exit(1)


if __name__ == "__main__":
    main()
