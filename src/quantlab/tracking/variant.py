"""A run's *variant*: every resolved setting that can change its numbers, and a short hash of it.

Tables pool only runs of the same variant (their seeds are repeats); a sweep skips a job whose
variant and seed already have an ``ok`` record; a rerun of the same variant and seed supersedes the
older record instead of adding a row. The seed is kept apart (it is what repeats vary).

What is in it (built from the typed :class:`~quantlab.experiment.RunSpec`, so every dataclass default is
included, not only what the YAML spelled out):

* ``model``: name, source, hub id, revision, dtype, the tiny model's kwargs and a *content* fingerprint
  of a local ``path`` (relative file names and sizes: the same files in another directory are the same
  model). Not in it: ``device``/``device_map`` (where it ran; recorded in ``env``), ``note``, and
  ``code_protocol`` (it only sets the code evaluators' default, and their resolved protocol is in ``evals``).
* ``quantizer``: the method name and its config with every knob (the format, with its zero convention,
  and W-A-KV included; LLM-QAT's data and training budget included), minus the config class's
  :attr:`execution_fields` (e.g. calibration batch size, cache directories).
* ``calib``: the calibration config, only when the run builds calibration data (same rule as the
  run, :mod:`quantlab.experiment`). The calibration *tokens* hash is known only after the data is built: it is recorded next
  to the variant (``RunRecord.calib["sha256"]``) and tables split runs whose tokens differ
  (:func:`quantlab.tracking.runset.label_variants`), but it is not part of :func:`variant_id`, so a job can be skipped before it loads
  anything.
* ``evals``: each evaluator's config (protocol, decoding, budget, dataset, ...), minus its
  :attr:`~quantlab.evals.base.Evaluator.execution_fields` (workers, resume, ...).
* ``deploy``: only for a packed model (``deploy.pack=true``, or ``model.path`` an exported low-bit
  checkpoint): ``{pack, backend}``, since the backend's kernel changes the numbers. Absent otherwise, so
  the ids of all other variants are what they were before packing existed; exports change no number.

Not in it: the experiment name, tags, logger, ``save_artifacts``, the seed (kept apart), the quantlab
version (recorded in ``env``; a code change that changes numbers is not detected here).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantlab.experiment import RunSpec

logger = logging.getLogger(__name__)

VARIANT_VERSION = 1
VARIANT_FILE = "variant.json"  # written into the run dir before the run starts
_MODEL_FIELDS = ("name", "source", "hub_id", "revision", "dtype", "tiny")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def variant_id(settings: dict[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of ``settings``."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:12]


def path_fingerprint(path: str | None) -> str | None:
    """Content fingerprint of a local model: SHA-256 (16 hex) over (relative name, size) of its files.

    None for no path; ``missing:<name>`` when the path does not exist (the loader will fail with its
    own clear error; the variant must still be computable).
    """
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p.name}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(p).parts))
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == p else f.relative_to(p).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _without(d: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in drop}


def variant_settings(spec: RunSpec) -> dict[str, Any]:
    """The variant of ``spec`` as a JSON-able dict (see the module docstring)."""
    from quantlab.experiment import calibration_needed
    from quantlab.quantizers.base import quantizer_class

    model = {k: getattr(spec.model, k) for k in _MODEL_FIELDS}
    model["path_fingerprint"] = path_fingerprint(spec.model.path)
    qcls = quantizer_class(spec.quantizer)
    qcfg = _without(spec.quantizer.to_dict(), tuple(getattr(spec.quantizer, "execution_fields", ())))
    calib = None
    if spec.calib is not None and calibration_needed(spec):
        calib = dataclasses.asdict(spec.calib)
    evals = {ev.name: ev.variant_settings() for ev in spec.evals}
    settings = {"model": model, "quantizer": {"name": qcls.name, "config": qcfg}, "calib": calib, "evals": evals,
                "version": VARIANT_VERSION}
    from quantlab.deploy.load import packed_quant_config

    path = Path(spec.model.path).expanduser() if spec.model.path else None
    deploy = spec.deploy.variant_settings(bool(path and packed_quant_config(path)))
    if deploy is not None:  # only packed runs carry it, so the ids of all other variants are unchanged
        settings["deploy"] = deploy
    return json.loads(_canonical(settings))  # plain JSON types (tuples -> lists), as read back from a record


def make_variant(spec: RunSpec) -> dict[str, Any]:
    """``{"id": <12 hex>, "settings": {...}, "slices": [...]}`` of ``spec`` (what :class:`RunRecord.variant`
    holds); ``slices`` are the dotted paths of the evaluators' ``slice_fields`` (not hashed separately)."""
    settings = variant_settings(spec)
    slices = [f"evals.{ev.name}.{f}" for ev in spec.evals for f in ev.slice_fields]
    return {"id": variant_id(settings), "settings": settings, "slices": slices}


def without_slices(variant: dict[str, Any]) -> dict[str, Any]:
    """The variant's settings without its slice paths: what one study's slices share."""
    settings = json.loads(_canonical(variant.get("settings") or {}))
    for path in variant.get("slices") or []:
        *parents, leaf = path.split(".")
        node = settings
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return settings


# ----------------------------------------------------------------------------- differences


_MISSING = object()


def _diff_paths(dicts: list[Any], prefix: str = "") -> list[str]:
    """Dotted paths at which ``dicts`` differ; a sub-dict missing from some of them is one path."""
    if all(isinstance(d, dict) for d in dicts):
        paths = []
        for key in sorted({k for d in dicts for k in d}):
            values = [d.get(key, _MISSING) for d in dicts]
            path = f"{prefix}.{key}" if prefix else str(key)
            if all(isinstance(v, dict) for v in values):
                paths += _diff_paths(values, path)
            elif len({_canonical(v) if v is not _MISSING else "\0missing" for v in values}) > 1:
                paths.append(path)
        return paths
    return [prefix] if len({_canonical(d) for d in dicts}) > 1 else []


def _get(settings: dict[str, Any], path: str) -> Any:
    cur: Any = settings
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


_SHORT_PREFIXES = ("quantizer.config.", "quantizer.", "evals.", "model.")


def _short(key: str) -> str:
    for p in _SHORT_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _show(value: Any) -> str:
    if value is _MISSING:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "on"
    if isinstance(value, list):
        text = _canonical(value)
        return text if len(text) <= 24 else text[:21] + "..."
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def differing_knobs(variants: dict[str, dict[str, Any]], max_knobs: int = 3) -> dict[str, str]:
    """``{variant id: "train.lr=2e-05"}``: the settings in which each variant differs from the others.

    Paths equal in every variant are dropped; a setting missing from a variant shows as ``-``, a
    sub-config present as ``on``; whether a variant ran an evaluator at all is named only when the other
    knobs leave two variants with the same label. At most ``max_knobs`` knobs are named (then ``+N``);
    variants whose settings are identical are told apart by their id.
    """
    ids = list(variants)
    differ = _diff_paths([variants[i] for i in ids])
    # an evaluator that only some variants ran matters less than a knob of the method or of a shared
    # evaluator: named only when the other knobs do not tell the variants apart
    present = [k for k in differ if k.count(".") == 1 and k.startswith("evals.")]
    knobs = [k for k in differ if k not in present]

    def labels(paths: list[str]) -> dict[str, str]:
        out = {}
        for vid in ids:
            parts = [f"{_short(k)}={_show(_get(variants[vid], k))}" for k in paths[:max_knobs]]
            if len(paths) > max_knobs:
                parts.append(f"+{len(paths) - max_knobs}")
            out[vid] = " ".join(parts)
        return out

    out = labels(knobs)
    if len(set(out.values())) < len(ids):
        out = labels(knobs + present)
    return {vid: text or f"v:{vid[:6]}" for vid, text in out.items()}
