"""``python -m quantlab`` / ``quantlab``: the Hydra entry point.

With no arguments it runs the demo (SmolLM2-135M: fp baseline and RTN w4 g64, code perplexity) and
prints a results table. ``+exp=NAME`` picks a preset from ``conf/exp``; ``-m`` sweeps.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from quantlab.errors import find_quantlab_error

log = logging.getLogger("quantlab")


def _config_dir() -> str:
    """Configs ship inside the wheel (``quantlab/conf``); an editable install reads the repo's ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parents[1] / "conf"):
        if (cand / "config.yaml").is_file():
            return str(cand)
    raise RuntimeError(f"quantlab configs not found next to {here} (broken install?)")


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from quantlab.pipeline import run

    hc = HydraConfig.get()
    choices = OmegaConf.to_container(hc.runtime.choices)
    try:
        record = run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), choices)
    except Exception as e:
        err = find_quantlab_error(e)
        if err is None:
            raise  # a bug: Hydra prints the traceback (set HYDRA_FULL_ERROR=1 for all frames)
        log.error("error: %s", err)
        sys.exit(2)
    first = next(iter(record.metrics.values()), None)
    return first  # lets Hydra sweepers (e.g. optuna) optimise the first metric


def main() -> None:
    """Console-script entry (``quantlab ...``), same as ``python -m quantlab``."""
    _hydra_main()


if __name__ == "__main__":
    main()
