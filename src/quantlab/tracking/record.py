"""The per-run result record (``result.json``) and atomic JSON/CSV writers.

One :class:`RunRecord` per run is the source of truth for every number quantlab reports: the
report CLI, the parquet index and the W&B summary are all views of :meth:`RunRecord.flat`.

Non-finite floats: JSON has no NaN/Infinity, so :func:`write_json_atomic` writes them as ``null``
and logs a warning naming each key. A perplexity that overflowed therefore reads back as None
("no valid number"), never as a plausible value; the *caller* (the pipeline) is expected to mark
such a run as failed or otherwise explain it in ``error``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from quantlab.errors import DataError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with milliseconds, e.g. ``2026-01-31T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    """A unique run id: UTC ``%Y%m%d-%H%M%S`` + ``-`` + 6 hex digits from uuid4."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunRecord:
    """Everything recorded about one run.

    Attributes:
        run_id: see :func:`new_run_id`.
        status: ``ok``, ``failed`` or ``skipped`` (a sweep job whose variant and seed already had an ok
            record: ``error["existing"]`` names it); ``incomplete`` is only synthesized by the report for
            run directories without a ``result.json``.
        experiment: study name (rows are grouped by it).
        output_dir: the run directory.
        started_at / finished_at: ISO-8601 UTC timestamps.
        wall_s: wall-clock seconds of the whole run.
        model: name, source, hub_id, path, revision, dtype, device, n_params, note.
        quantizer: ``{"name": ..., "config": {...}}``.
        format: ``QuantFormat.to_dict()`` plus ``short_name``; None for the full-precision baseline.
        bits_per_weight: storage bits per weight including scales/zeros.
        calib: ``CalibData.describe()`` or None when the method needs no calibration.
        metrics: ``name -> value``; None means the value was non-finite (see module docstring).
        provenance: ``metric name -> facts`` (protocol, seqlen, dataset, n_tokens, ...).
        per_item: ``metric name -> {item id -> value}`` (see :attr:`quantlab.types.EvalResult.per_item`);
            empty in records written before it existed.
        quant_summary: scalar facts returned by the quantizer.
        quant_time_s: seconds spent in ``Quantizer.quantize``.
        peak_memory: see :func:`quantlab.tracking.env.peak_memory`.
        env: see :func:`quantlab.tracking.env.capture_env`.
        overrides: Hydra command-line overrides of this run.
        tags: free-form labels.
        seed: the run's seed.
        variant: ``{"id", "settings"}``: every setting that can change the numbers and its 12-hex hash
            (:mod:`quantlab.tracking.variant`); None when the config could not be built, and in records
            written before it existed (the report recomputes it from ``config_resolved.json``).
        error: ``{"type", "message", "traceback"}`` when ``status == "failed"``.
        schema_version: version of this layout.
    """

    run_id: str
    status: str
    experiment: str
    output_dir: str
    started_at: str
    finished_at: str | None = None
    wall_s: float | None = None
    model: dict[str, Any] = field(default_factory=dict)
    quantizer: dict[str, Any] = field(default_factory=dict)
    format: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    calib: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_item: dict[str, dict[str, Any]] = field(default_factory=dict)
    quant_summary: dict[str, Any] = field(default_factory=dict)
    quant_time_s: float | None = None
    peak_memory: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    seed: int = 0
    variant: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order (deep copy)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """Build a record from :meth:`to_dict` output.

        Keys unknown to this version (written by a newer schema) are dropped with a warning.

        Raises:
            DataError: ``d`` is not a dict or lacks a required field.
        """
        if not isinstance(d, dict):
            raise DataError(f"run record must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            logger.warning(
                "run record %s (schema_version %s; this quantlab reads %s) has unknown keys %s: ignored",
                d.get("run_id"), d.get("schema_version"), SCHEMA_VERSION, unknown,
            )
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise DataError(f"run record {d.get('run_id')!r} lacks required keys {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def format_name(self) -> str | None:
        """``format.short_name``; ``fp`` for the identity baseline; None when unknown."""
        if self.format:
            return self.format.get("short_name")
        quantizer = self.quantizer or {}
        if quantizer.get("name") == "none":
            return "fp"
        return None

    def flat(self) -> dict[str, Any]:
        """One row of scalars (the report / parquet / W&B summary row).

        Metrics appear under their own (namespaced, ``/``-containing) keys; no other key contains
        ``/``. ``format`` is ``fp`` for the ``none`` quantizer and None when a non-identity run
        has no format (e.g. it failed before the quantizer was built). ``calibrated_on_eval_set`` is
        True when ``calib["calibrated_on_eval_set"]`` lists evaluators whose own items the calibration
        set was drawn from (the result is then not a held-out one).
        """
        calib = self.calib or {}
        model = self.model or {}
        env = self.env or {}
        packages = env.get("packages") or {}
        mem = self.peak_memory or {}
        on_eval = calib.get("calibrated_on_eval_set")  # evaluators whose items the calibration set reused
        row: dict[str, Any] = {
            "experiment": self.experiment,
            "run_id": self.run_id,
            "status": self.status,
            "model": model.get("name"),
            "quantizer": (self.quantizer or {}).get("name"),
            "format": self.format_name(),
            "method": (self.quant_summary or {}).get("display_label") or (self.quant_summary or {}).get("method_label"),
            "wakv": (self.quant_summary or {}).get("wakv"),
            "bits_per_weight": self.bits_per_weight,
            "seed": self.seed,
            "variant": (self.variant or {}).get("id"),
        }
        for name, value in (self.metrics or {}).items():
            if name in row:
                logger.warning("metric %r collides with a record column; stored as 'metric:%s'", name, name)
                row[f"metric:{name}"] = value
            else:
                row[name] = value
        row.update({
            "quant_time_s": self.quant_time_s,
            "wall_s": self.wall_s,
            "peak_rss_gb": mem.get("peak_rss_gb"),
            "peak_cuda_gb": mem.get("peak_cuda_gb"),
            "calib.name": calib.get("name"),
            "calib.n_samples": calib.get("n_samples"),
            "calib.seqlen": calib.get("seqlen"),
            "calib.seed": calib.get("seed"),
            "calib.sha256": calib.get("sha256"),
            "calibrated_on_eval_set": isinstance(on_eval, (list, tuple)) and len(on_eval) > 0,
            "model.revision": model.get("revision"),
            "model_note": model.get("note") or None,
            "model.dtype": model.get("dtype"),
            "device": model.get("device") or env.get("device"),
            "gpu_name": env.get("gpu_name"),
            "git_sha": env.get("git_sha"),
            "git_dirty": env.get("git_dirty"),
            "torch": env.get("torch"),
            "transformers": packages.get("transformers"),
            "quantlab": env.get("quantlab"),
            "started_at": self.started_at,
            "tags": ",".join(map(str, self.tags or [])),
            "overrides": " ".join(map(str, self.overrides or [])),
            "output_dir": self.output_dir,
            "error": (self.error or {}).get("message"),
            "schema_version": self.schema_version,
        })
        return row


def new_record(output_dir: str | Path, experiment: str = "default", **fields: Any) -> RunRecord:
    """A run's record before it starts: a fresh id, ``started_at`` now, ``status="failed"`` until the run
    says otherwise; ``fields`` are any other :class:`RunRecord` fields (overrides, tags, seed, quantizer)."""
    return RunRecord(run_id=new_run_id(), status="failed", experiment=experiment, output_dir=str(output_dir),
                     started_at=utc_now_iso(), **fields)


# ----------------------------------------------------------------------------- JSON / atomic writes


def _to_jsonable(obj: Any) -> Any:
    """``json.dump`` ``default=`` hook: Path, tuple/set, numpy/torch scalars and arrays, dataclasses."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch 0-d scalar
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy array / torch tensor
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _finite(obj: Any, path: str, bad: list[str]) -> Any:
    """Copy of ``obj`` with non-finite floats replaced by None; their key paths are added to ``bad``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path or "<root>")
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def _atomic_write(path: Path, write: Callable[[IO[str]], object]) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, then ``os.replace``.

    On any error the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with mode 0o666 so the final file gets the usual umask-derived permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself (best effort; not supported on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: f.write(text))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`_atomic_write`).

    Paths, tuples, numpy/torch scalars and dataclasses are converted. Non-finite floats are
    written as ``null`` with a logged warning listing their keys (JSON cannot hold NaN/Infinity;
    see the module docstring). An unserializable object raises ``TypeError`` and leaves any
    previous file at ``path`` intact.
    """
    bad: list[str] = []

    def default(o: Any) -> Any:
        return _finite(_to_jsonable(o), f"<{type(o).__name__}>", bad)

    data = _finite(obj, "", bad)

    def write(f: IO[str]) -> None:
        json.dump(data, f, indent=2, allow_nan=False, default=default)
        f.write("\n")

    _atomic_write(path, write)
    if bad:
        logger.warning("%s: non-finite values written as null at %s", path, bad)


def write_record(record: RunRecord, run_dir: Path) -> Path:
    """Write ``run_dir/result.json`` atomically and return its path."""
    path = Path(run_dir) / RESULT_FILE
    write_json_atomic(path, record.to_dict())
    return path


def read_record(path: Path) -> RunRecord:
    """Read a ``result.json`` (or the ``result.json`` inside directory ``path``).

    Raises:
        DataError: the file is missing, is not valid JSON or is not a run record.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read run record: {exc}") from exc
    try:
        return RunRecord.from_dict(d)
    except (DataError, TypeError) as exc:
        raise DataError(f"{path}: {exc}") from exc


# ----------------------------------------------------------------------------- tables


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision; nan/inf are written as "nan"/"inf"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=_to_jsonable)
    if isinstance(value, Path):
        return str(value)
    return value


def write_table(rows: list[dict[str, Any]], run_dir: Path, name: str) -> list[Path]:
    """Write ``rows`` as ``run_dir/<name>.csv`` and ``run_dir/<name>.json``, both atomically.

    The CSV header is the union of the rows' keys in first-seen order; missing cells are empty,
    floats are written at full precision (non-finite ones as ``nan``/``inf``; in the JSON copy they
    become null, see :func:`write_json_atomic`), nested values as JSON.

    Raises:
        ValueError: ``name`` is not a plain file stem.
    """
    if not name or name != Path(name).name or name in (".", ".."):
        raise ValueError(f"table name must be a plain file name without directories, got {name!r}")
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    run_dir = Path(run_dir)
    csv_path, json_path = run_dir / f"{name}.csv", run_dir / f"{name}.json"
    write_text_atomic(csv_path, buf.getvalue())
    write_json_atomic(json_path, rows)
    return [csv_path, json_path]
