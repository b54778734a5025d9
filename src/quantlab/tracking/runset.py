"""From the records on disk to the rows of the tables: variants, reruns, labels.

* Every record gets its variant (:mod:`quantlab.tracking.variant`): recorded since it existed, else read
  from the run dir's ``variant.json`` (written before a run starts, so an interrupted run has one), else
  recomputed from its ``config_resolved.json`` (older records; best effort, ``None`` if that fails).
* Reruns never duplicate (:func:`resolve`): records of the same experiment, variant and seed are one
  run. The newest ``ok`` record wins; without one, the newest failed/incomplete record stays (so a failure
  is still shown); every other record is *superseded* and listed in the report's footer, never in a
  cell. ``skipped`` records (a sweep job whose run already existed) are never rows either.
* Pooled tables (method x model shapes, paired comparisons) see each (variant, seed) once across
  experiments (:func:`pooled`), so the same run reported by two studies is not counted twice.
* Labels (:func:`label_variants`): two variants that share a method label and model get labels that
  name the knobs in which they differ (``llm_qat w4pcs 4-8-4 [train.lr=2e-05]``), so no table pools them.
  Slices of one study (jobs that differ only in an evaluator's ``slice_fields``, e.g. one sampling-sweep
  temperature each) keep one label, so the study's tables join them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from quantlab.errors import DataError
from quantlab.tracking.record import RESULT_FILE, RunRecord, read_record
from quantlab.tracking.variant import VARIANT_FILE, differing_knobs, variant_id, without_slices

logger = logging.getLogger(__name__)

SUPERSEDED_TITLE = "Superseded and skipped records (not in any table)"


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _from_config(run_dir: Path) -> dict[str, Any] | None:
    """The variant of an older run, rebuilt from its ``config_resolved.json`` (None when it cannot be)."""
    cfg = read_json(run_dir / "config_resolved.json")
    if not isinstance(cfg, dict):
        return None
    try:
        from omegaconf import OmegaConf

        from quantlab.cli import build_spec
        from quantlab.tracking.variant import make_variant

        return make_variant(build_spec(OmegaConf.create(cfg)))
    except Exception as exc:  # noqa: BLE001 (an old or foreign config: the run keeps no variant (never pooled with others))
        logger.info("%s: variant not recomputable from config_resolved.json (%s)", run_dir, exc)
        return None


def with_variant(record: RunRecord, run_dir: Path | None = None) -> RunRecord:
    """``record`` with its variant filled in where it can be (a copy; the record on disk is unchanged).

    ``run_dir``: where its files are (default ``record.output_dir``; differs for a copied results tree).
    """
    if record.variant or not (run_dir or record.output_dir):
        return record
    run_dir = Path(run_dir or record.output_dir)
    variant = read_json(run_dir / VARIANT_FILE)
    if not (isinstance(variant, dict) and variant.get("id")):
        variant = _from_config(run_dir)
    return dataclasses.replace(record, variant=variant) if variant else record


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return None


def _incomplete_record(run_dir: Path, root: Path) -> RunRecord:
    """A placeholder row for a Hydra run dir without ``result.json`` (best effort from ``.hydra/``)."""
    hydra_dir = run_dir / ".hydra"
    cfg = _load_yaml(hydra_dir / "config.yaml")
    cfg = cfg if isinstance(cfg, dict) else {}
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml")
    choices: dict[str, Any] = {}
    if isinstance(hydra_cfg, dict):
        choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    overrides = _load_yaml(hydra_dir / "overrides.yaml")
    experiment = next((v for v in (cfg.get("experiment"), cfg.get("exp"), choices.get("exp"))
                       if isinstance(v, str)), "")
    seed = cfg.get("seed")
    rel = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    started = datetime.fromtimestamp(hydra_dir.stat().st_mtime, tz=timezone.utc)
    return RunRecord(
        run_id=rel,
        status="incomplete",
        experiment=experiment,
        output_dir=str(run_dir),
        started_at=started.isoformat(timespec="milliseconds"),
        model={"name": choices.get("model")},
        quantizer={"name": choices.get("quantizer")},
        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
        seed=seed if isinstance(seed, int) else 0,
        error={"type": "Incomplete", "message": "no result.json: the run was killed, crashed hard or is still running",
               "traceback": None},
    )


def collect(root: Path) -> list[RunRecord]:
    """All run records below ``root`` (recursive), sorted by (experiment, started_at), with their variants
    (:func:`with_variant`); the earlier run a ``skipped`` job stands for is included even when it lies
    outside ``root``.

    Unreadable or invalid ``result.json`` files are skipped with a warning naming the file. A
    directory with ``.hydra/`` but no ``result.json`` yields a ``status="incomplete"`` record whose
    model/quantizer come from Hydra's config-group choices (YAML names, e.g. ``bnb_nf4``).
    """
    root = Path(root)
    records: list[RunRecord] = []
    for path in sorted(root.rglob(RESULT_FILE)):
        if not path.is_file():
            continue
        try:
            records.append(with_variant(read_record(path), path.parent))
        except DataError as exc:
            logger.warning("skipping unreadable run record: %s", exc)
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if hydra_dir.is_dir() and not (run_dir / RESULT_FILE).exists():
            records.append(with_variant(_incomplete_record(run_dir, root)))
    seen = {str(Path(r.output_dir).resolve()) for r in records if r.output_dir}
    for r in list(records):  # a skipped sweep job stands for an earlier run, maybe in another sweep dir
        existing = (r.error or {}).get("existing") if r.status == "skipped" else None
        if existing and str(Path(existing).resolve()) not in seen and (Path(existing) / RESULT_FILE).is_file():
            seen.add(str(Path(existing).resolve()))
            try:
                records.append(with_variant(read_record(Path(existing))))
            except DataError as exc:
                logger.warning("skipped job %s: its earlier run is unreadable: %s", r.output_dir, exc)
    records.sort(key=lambda r: (r.experiment or "", r.started_at or "", r.run_id or ""))
    return records


def _vid(record: RunRecord) -> str | None:
    return (record.variant or {}).get("id")


def _newest(records: list[RunRecord]) -> RunRecord:
    return max(records, key=lambda r: (r.finished_at or r.started_at or "", r.started_at or "", r.run_id))


@dataclass
class Resolved:
    """:func:`resolve`'s answer: the records that are rows, and the others with the reason."""

    rows: list[RunRecord] = field(default_factory=list)
    superseded: list[tuple[RunRecord, str]] = field(default_factory=list)


def resolve(records: Sequence[RunRecord]) -> Resolved:
    """One row per (experiment, variant, seed); see the module docstring. Records without a variant are
    rows of their own. Order of ``records`` is kept."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    out = Resolved()
    for r in records:
        if r.status == "skipped":
            existing = (r.error or {}).get("existing") or "?"
            out.superseded.append((r, f"skipped: same variant and seed as {existing}"))
        elif _vid(r) is None:
            groups[("run", r.run_id, r.output_dir)].append(r)
        else:
            groups[(r.experiment, _vid(r), r.seed)].append(r)
    winners = set()
    for group in groups.values():
        ok = [r for r in group if r.status == "ok"]
        win = _newest(ok or group)
        winners.add(id(win))
        for r in group:
            if r is not win:
                out.superseded.append((r, f"superseded by {win.run_id} ({win.status})"))
    out.rows = [r for r in records if id(r) in winners]
    return out


def pooled(records: Sequence[RunRecord]) -> list[RunRecord]:
    """The ok records with each (variant, seed) once across experiments (the newest wins)."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status == "ok":
            groups[(_vid(r), r.seed) if _vid(r) else ("run", r.run_id)].append(r)
    keep = {id(_newest(g)) for g in groups.values()}
    return [r for r in records if id(r) in keep]


def _base_label(r: RunRecord) -> str:
    label = (r.quant_summary or {}).get("method_label")
    if label:
        return str(label)
    return " ".join(x for x in ((r.quantizer or {}).get("name") or "?", r.format_name() or "") if x)


def _label_settings(r: RunRecord) -> dict[str, Any]:
    """What shares one label: the variant without its slice fields, plus the calibration tokens' hash."""
    return dict(without_slices(r.variant or {}), calib_tokens=(r.calib or {}).get("sha256"))


def _label_key(r: RunRecord) -> str | None:
    return variant_id(_label_settings(r)) if _vid(r) else None


def label_variants(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Copies of ``records`` with a ``quant_summary["display_label"]`` (the ``method`` column of
    :meth:`RunRecord.flat`) that names the knobs in which the run differs from other variants with the
    same method label and model (see the module docstring); the recorded ``method_label`` is kept."""
    by_label: dict[tuple, dict[str, RunRecord]] = defaultdict(dict)
    for r in records:
        key = _label_key(r)
        if key:
            by_label[(_base_label(r), (r.model or {}).get("name"))].setdefault(key, r)
    suffix: dict[str, str] = {}
    for variants in by_label.values():
        if len(variants) < 2:
            continue
        suffix.update(differing_knobs({k: _label_settings(r) for k, r in variants.items()}))
    out = []
    for r in records:
        extra = suffix.get(_label_key(r) or "")
        if extra:
            qs = dict(r.quant_summary or {})
            qs["display_label"] = f"{_base_label(r)} [{extra}]"
            r = dataclasses.replace(r, quant_summary=qs)
        out.append(r)
    return out


def superseded_frame(resolved: Resolved) -> pd.DataFrame:
    """The footer: every superseded or skipped record with why (empty frame when none)."""
    rows = [{"experiment": r.experiment, "run_id": r.run_id, "status": r.status, "variant": _vid(r), "seed": r.seed,
             "why": why, "output_dir": r.output_dir} for r, why in resolved.superseded]
    return pd.DataFrame.from_records(rows, columns=["experiment", "run_id", "status", "variant", "seed", "why",
                                                    "output_dir"])
