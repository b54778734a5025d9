"""Optional Weights & Biases logging: a thin view of the run record.

``result.json`` stays the source of truth; W&B receives the same :meth:`RunRecord.flat` row as
its run summary, the metrics as one ``run.log`` step and each evaluator table as a
``wandb.Table``. ``logger=none`` (the default) uses the no-op :class:`Tracker`.

wandb is imported lazily, only when ``logger.kind=wandb``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from quantlab.errors import ConfigError
from quantlab.tracking.record import RunRecord

logger = logging.getLogger(__name__)

KINDS = ("none", "wandb")
MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class LoggerConfig:
    """Experiment-tracker settings (``conf/logger/*.yaml``).

    Attributes:
        kind: ``none`` (no tracker) or ``wandb``.
        project: W&B project.
        entity: W&B entity (user or team); None = the account's default.
        mode: ``offline`` (default: runs are written locally, upload later with ``wandb sync``),
            ``online`` or ``disabled``.
        dir: directory W&B writes ``wandb/`` into; None = the run directory.
        tags: tags added to every run (besides the run's own ``tags``).
    """

    kind: str = "none"
    project: str = "quantlab"
    entity: str | None = None
    mode: str = "offline"
    dir: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("logger.kind", f"must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ConfigError("logger.mode", f"must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError("logger.project", f"must be a non-empty string, got {self.project!r}")
        if self.entity is not None and not isinstance(self.entity, str):
            raise ConfigError("logger.entity", f"must be a string or null, got {self.entity!r}")
        if self.dir is not None and not isinstance(self.dir, (str, Path)):
            raise ConfigError("logger.dir", f"must be a path or null, got {self.dir!r}")
        tags = (self.tags,) if isinstance(self.tags, str) else self.tags
        try:
            tags = tuple(tags)
        except TypeError:
            raise ConfigError("logger.tags", f"must be a list of strings, got {self.tags!r}") from None
        if not all(isinstance(t, str) for t in tags):
            raise ConfigError("logger.tags", f"must be a list of strings, got {self.tags!r}")
        object.__setattr__(self, "tags", tags)
        if self.dir is not None:
            object.__setattr__(self, "dir", str(self.dir))


class Tracker:
    """No-op tracker (``logger=none``); also the interface every tracker implements."""

    def start(self, *, run_id: str, experiment: str, quantizer: str, config: dict[str, Any],
              output_dir: Path, tags: list[str]) -> None:
        """Open a tracker run. ``config`` is the resolved run config as plain containers."""

    def log_result(self, record: RunRecord, tables: dict[str, list[dict[str, Any]]],
                   images: dict[str, str] | None = None) -> None:
        """Send the final record, the tables (evaluators' and the method's) and image files (plots)."""

    def finish(self, ok: bool) -> None:
        """Close the tracker run, marking it successful (``ok``) or failed. Safe to call twice."""


def _cell(value: Any) -> Any:
    """A W&B table cell: scalars as-is, nested values as JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


#: a table whose name ends so (``qat_loss_curve``: rows ``{"step", "loss", "lr"}``) is also logged point by point
CURVE_SUFFIX = "_curve"


def _table_payload(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (union of keys, first-seen order) and row-major data; missing cells are None."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    cols = [str(c) for c in columns]
    return cols, [[_cell(row.get(c)) for c in columns] for row in rows]


class WandbTracker(Tracker):
    """Logs one quantlab run as one W&B run (``name=id=run_id``, ``group=experiment``, ``job_type=quantizer``).

    Several runs per process (Hydra multirun with the basic launcher) are supported: ``init`` uses
    ``reinit="finish_previous"``. Console capture is off (Hydra already writes ``run.log``).

    Raises:
        ConfigError: wandb is not installed.
    """

    def __init__(self, cfg: LoggerConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger", "logger=wandb needs the wandb package: pip install 'quantlab[wandb]'") from None
        self._wandb = wandb
        self.cfg = cfg
        self.run: Any = None

    def start(self, *, run_id: str, experiment: str, quantizer: str, config: dict[str, Any],
              output_dir: Path, tags: list[str]) -> None:
        wandb_dir = Path(self.cfg.dir) if self.cfg.dir else Path(output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        all_tags = list(dict.fromkeys([*self.cfg.tags, *tags]))
        self.run = self._wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=cast(Any, self.cfg.mode),  # validated against MODES
            dir=str(wandb_dir),
            id=run_id,
            name=run_id,
            group=experiment or None,
            job_type=quantizer,
            tags=all_tags,
            config=config,
            reinit="finish_previous",
            # wandb >= 0.19 has no start_method setting (its service runs out of process), so the
            # old Hydra advice `start_method="thread"` does not apply.
            settings=self._wandb.Settings(console="off"),
        )
        logger.info("W&B run %s (%s mode) in %s", run_id, self.cfg.mode, wandb_dir)

    def log_result(self, record: RunRecord, tables: dict[str, list[dict[str, Any]]],
                   images: dict[str, str] | None = None) -> None:
        if self.run is None:
            raise RuntimeError("WandbTracker.log_result called before start()")
        self.run.summary.update(record.flat())
        payload: dict[str, Any] = {k: v for k, v in record.metrics.items()
                                   if isinstance(v, (int, float)) and math.isfinite(v)}
        last = 0
        for name, rows in tables.items():  # *_curve tables (QAT loss) become W&B line charts, one point per step
            if not name.endswith(CURVE_SUFFIX):
                continue
            for row in rows:
                point = {f"{name}/{k}": v for k, v in row.items()
                         if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
                if point and isinstance(row.get("step"), int) and row["step"] > last:
                    last = row["step"]
                    self.run.log(point, step=last)
        for name, rows in tables.items():
            if not rows:
                continue
            columns, data = _table_payload(rows)
            payload[f"table/{name}"] = self._wandb.Table(columns=cast(list[str | int], columns), data=data,
                                                         allow_mixed_types=True)
        for name, path in (images or {}).items():
            payload[f"plot/{name}"] = self._wandb.Image(str(path))
        if payload:
            self.run.log(payload, **({"step": last + 1} if last else {}))

    def finish(self, ok: bool) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=0 if ok else 1)


def make_tracker(cfg: LoggerConfig | None) -> Tracker:
    """The tracker for ``cfg``: :class:`WandbTracker` for ``kind="wandb"``, else the no-op :class:`Tracker`."""
    if cfg is None or cfg.kind == "none":
        return Tracker()
    return WandbTracker(cfg)
