"""Hydra callback that prints the comparison table when a run or a multirun ends, and after a multirun
lists its failed jobs (:data:`SWEEP_FAILURES`; ``python -m quantlab`` then exits 1).

Enable it in a Hydra config::

    hydra:
      callbacks:
        print_report:
          _target_: quantlab.tracking.callbacks.PrintReport
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from quantlab.tracking.report import print_summary

logger = logging.getLogger(__name__)

#: ``(job dir, one-line error)`` of the failed jobs of the last sweep this process ran (``main`` exits 1)
SWEEP_FAILURES: list[tuple[str, str]] = []


class PrintReport(Callback):
    """Print :func:`quantlab.tracking.report.print_summary` of the run dir / sweep dir.

    Any exception is logged and swallowed: the report must never turn a finished run into a
    failed one.

    Args:
        enabled: set False to keep the callback configured but silent.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def _print(self, root: Any, what: str) -> None:
        if not self.enabled:
            return
        try:
            if root is None:
                logger.warning("PrintReport: %s output directory unknown; no summary printed", what)
                return
            print_summary(Path(str(root)))
        except Exception:  # a report problem must not break the run
            logger.warning("PrintReport: could not print the %s summary of %s", what, root, exc_info=True)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        """RUN mode: ``config.hydra.runtime.output_dir`` (absolute; set by Hydra's ``run_job``)."""
        root = None
        try:
            root = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
            if root is None and kwargs.get("job_return") is not None:
                hydra_cfg: Any = getattr(kwargs["job_return"], "hydra_cfg", None)
                root = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None)
        except Exception:  # never break the run over the report
            logger.warning("PrintReport: cannot resolve hydra.runtime.output_dir", exc_info=True)
        self._print(root, "run")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """MULTIRUN mode: ``config.hydra.sweep.dir`` (the jobs are its subdirectories).

        At multirun end ``config`` is the sweep-level config (``hydra.runtime.output_dir`` is not a
        job's dir); ``${now:...}`` in ``sweep.dir`` resolves to the same time as during the jobs
        because Hydra registers ``now`` with ``use_cache=True``.
        """
        root = None
        try:
            root = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        except Exception:  # never break the run over the report
            logger.warning("PrintReport: cannot resolve hydra.sweep.dir", exc_info=True)
        self._print(root, "multirun")
        if root is not None:  # even when printing is disabled: the failures decide the exit status
            from quantlab.sweep import log_failures

            SWEEP_FAILURES[:] = log_failures(Path(str(root)))
