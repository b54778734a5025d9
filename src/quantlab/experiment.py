"""One experiment on typed objects: load -> (calibrate) -> quantize -> evaluate -> record.

:mod:`quantlab.cli` (the Hydra edge) turns the composed config into a :class:`RunSpec`; nothing here sees
Hydra. The run's one outcome object is its :class:`~quantlab.tracking.record.RunRecord`: :func:`execute`
writes every fact into it as soon as it is known, so a run that fails half-way still records what it
found, and :func:`run` writes it exactly once, atomically, ``status=ok`` only when everything finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quantlab import wakv_step
from quantlab.calib.datasets import CalibConfig, build_calib
from quantlab.deploy.config import DeployConfig, check_exports_early, check_packable
from quantlab.deploy.run import deploy_result, loaded_format, packed_footprint, prepare_loaded
from quantlab.errors import ConfigError, find_quantlab_error
from quantlab.evals.base import Evaluator
from quantlab.metrics.footprint import GB, model_footprint, packed_estimate
from quantlab.models.loaders import LoadedModel, ModelConfig, load_model
from quantlab.models.offload import check_offloadable
from quantlab.nn.swap import iter_linears
from quantlab.quantizers.artifacts import ARTIFACTS_FILE, save_artifacts
from quantlab.quantizers.base import Quantizer, QuantizerConfig, build_quantizer, quantizer_class
from quantlab.tracking.env import capture_env, peak_memory, reset_peak_cuda
from quantlab.tracking.record import RunRecord, utc_now_iso, write_json_atomic, write_record, write_table
from quantlab.tracking.rss import RssSampler
from quantlab.tracking.variant import VARIANT_FILE, make_variant
from quantlab.tracking.wandb_logger import LoggerConfig, Tracker, make_tracker
from quantlab.types import CalibData, EvalResult, RunContext
from quantlab.utils.hashing import fingerprint
from quantlab.utils.torch_utils import get_linear, resolve_device, resolve_dtype, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, as typed objects.

    Attributes:
        model: which model to load.
        quantizer: the method's config (its type selects the quantizer class).
        calib: calibration set; built only if the quantizer or an evaluator needs it.
        evals: evaluators, run in order on the quantized model.
        seed: seeds every RNG before loading.
        save_artifacts: write the quantizer's artifacts to ``artifacts.safetensors`` (the config's default too).
        deploy: pack the quantized model into real low-bit layers and/or export checkpoints.
        logger: the experiment tracker (W&B or none).
    """

    model: ModelConfig
    quantizer: QuantizerConfig
    calib: CalibConfig | None = None
    evals: tuple[Evaluator, ...] = ()
    seed: int = 0
    save_artifacts: bool = True
    deploy: DeployConfig = field(default_factory=DeployConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class RunExtras:
    """What a run produces besides its record: named tables (also written as files) and images, for the tracker."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)


def weighted_bits_per_weight(quantizer: Quantizer, model: nn.Module, layers: list[str]) -> float | None:
    """Storage bits per weight over the quantized Linears (weighted by their weight counts)."""
    fmt = quantizer.format
    if fmt is None or not layers:
        return None
    total = bits = 0.0
    for name in layers:
        mod = get_linear(model, name)
        n = mod.in_features * mod.out_features  # not weight.numel(): bitsandbytes packs 2 codes per byte
        total += n
        bits += n * quantizer.bits_per_weight(mod.in_features)
    return bits / total


def source_hash() -> str:
    """sha256 over quantlab's own Python sources (changes whenever the code that produces results does)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def calibration_needed(spec: RunSpec) -> bool:
    """Does this run build calibration data? The method needs it (and is not re-applying saved artifacts),
    or an evaluator needs it (layer diagnostics) and the method quantizes."""
    cls = quantizer_class(spec.quantizer)
    method = cls.requires_calibration and not getattr(spec.quantizer, "load_artifacts", None)
    return method or (not cls.is_identity and any(e.requires_calibration for e in spec.evals))


def run_fingerprint(spec: RunSpec, calib: CalibData | None) -> str:
    """Hash of everything that determines the quantized model: model and method configs, the
    calibration tokens actually used, the seed and quantlab's source code. Evaluators cache
    generations under it (a rerun of the same command resumes; any change starts afresh)."""
    return fingerprint({
        "model": dataclasses.asdict(spec.model),
        "quantizer": spec.quantizer.to_dict(),
        "calib": calib.sha256 if calib is not None else None,
        "seed": spec.seed,
        "source": source_hash(),
    })


def _snapshot_weights(quantizer: Quantizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the selected Linears' weights (for layer diagnostics; costs one model's memory)."""
    return {name: mod.weight.detach().to("cpu", copy=True) for name, mod in quantizer.target_linears(model)}


def _footprint_metrics(quantizer: Quantizer, model: nn.Module, layers: list[str], packed: bool = False) -> EvalResult:
    """``memory/footprint_gb`` (what the model holds, bitsandbytes states included; Table 6) and, for
    fake-quantized runs whose weights stay floating point, ``memory/packed_est_gb``."""
    out = EvalResult()
    fp = model_footprint(model)
    out.metrics["memory/footprint_gb"] = fp.total / GB
    out.provenance["memory/footprint_gb"] = {
        "protocol": "params + buffers + bitsandbytes quantization states, each storage once", **fp.describe(),
        "hf_get_memory_footprint_gb": fp.hf / GB,
    }
    if packed:
        return packed_footprint(model, out)
    fmt = quantizer.format
    if fmt is not None and layers and not quantizer.quantizes_at_load:
        bpw = {n: quantizer.bits_per_weight(get_linear(model, n).in_features) for n in layers}
        out.metrics["memory/packed_est_gb"] = packed_estimate(model, bpw) / GB
        out.provenance["memory/packed_est_gb"] = {
            "protocol": "estimate: quantized Linears at their bits per weight (scales included), "
                        "everything else as held; the run itself holds fake-quantized fp weights",
            "format": fmt.short_name(),
        }
    return out


def _load(spec: RunSpec, quantizer: Quantizer) -> tuple[LoadedModel, dict[str, torch.Tensor] | None]:
    """The model, loaded through the quantizer when it quantizes at load time (bitsandbytes), after
    checking that it can run on the device. Then, if an evaluator compares against full-precision
    weights, those come from a separate unquantized load first (one model's Linear weights, on CPU)."""
    if not quantizer.quantizes_at_load:
        return load_model(spec.model), None
    fp_weights = None
    if any(e.requires_fp_weights for e in spec.evals):
        fp_model = load_model(spec.model).model
        fp_weights = {n: m.weight.detach().to("cpu", copy=True) for n, m in iter_linears(fp_model, ("*",), ())}
        del fp_model
    dtype = resolve_dtype(spec.model.dtype)
    dtype = torch.float32 if dtype == "auto" else cast(torch.dtype, dtype)
    quantizer.prepare(resolve_device(spec.model.device), dtype)
    seed_everything(spec.seed)
    return load_model(spec.model, quantization_config=quantizer.load_config(dtype)), fp_weights


def _merge_eval(out: RunRecord, extras: RunExtras, ev: Evaluator, res: EvalResult, wall_s: float) -> None:
    for key, value in res.metrics.items():
        if key in out.metrics:
            raise ConfigError("eval", f"two evaluators produce metric {key!r}; give them different names")
        out.metrics[key] = value
        out.provenance[key] = {**res.provenance.get(key, {}), "evaluator": ev.kind, "eval_wall_s": round(wall_s, 3)}
    for key, items in res.per_item.items():
        if key in out.per_item:
            raise ConfigError("eval", f"two evaluators produce per-item data {key!r}; name them apart")
        out.per_item[key] = items
    for name, rows in res.tables.items():
        extras.tables[name] = rows
    extras.images.update({k: str(v) for k, v in res.images.items()})


def execute(spec: RunSpec, output_dir: Path, out: RunRecord, quantizer: Quantizer | None = None) -> RunExtras:
    """Run one experiment described by ``spec``; files go below ``output_dir``.

    Facts are written into the record ``out`` as they become known, so it keeps them (model,
    calibration, ...) even when a later step raises. ``quantizer``: the one built from ``spec.quantizer``
    (built here when not given).
    """
    extras = RunExtras()
    seed_everything(spec.seed)
    quantizer = quantizer if quantizer is not None else build_quantizer(spec.quantizer)
    out.quantizer = {**out.quantizer, "name": quantizer.name}
    if spec.deploy.needs_codes:
        check_packable(quantizer, "deploy.pack" if spec.deploy.pack else "deploy.export")
        check_exports_early(quantizer, spec.deploy.export)
    if spec.model.offload is not None:
        check_offloadable(quantizer, spec.deploy.needs_codes)
    loaded, fp_weights = _load(spec, quantizer)
    model, tok = loaded.model, loaded.tokenizer
    out.model = loaded.info
    loaded_label = prepare_loaded(loaded, quantizer, spec.deploy)  # an exported checkpoint: packed layers
    if loaded_label:
        out.format, out.bits_per_weight = loaded_format(model, loaded.info["packed_checkpoint"])
    quantizer.validate(model)
    wakv_step.check(quantizer, model)

    quantizes = not quantizer.is_identity
    needs_calib = calibration_needed(spec)
    calib: CalibData | None = None
    if needs_calib:
        if spec.calib is None:
            raise ConfigError("calib", f"quantizer {quantizer.name!r} or an evaluator needs calibration data")
        calib = build_calib(spec.calib, tok, vocab_size=getattr(model.config, "vocab_size", None))
        out.calib = calib.describe()
    wants_fp = quantizes and any(e.requires_fp_weights for e in spec.evals)
    if wants_fp and fp_weights is None:
        fp_weights = _snapshot_weights(quantizer, model)
    ctx = RunContext(
        device=loaded.device, seed=spec.seed, output_dir=output_dir, tokenizer=tok, calib=calib,
        keep_reference_weights=wants_fp, run_fingerprint=run_fingerprint(spec, calib),
        method_label=loaded_label or quantizer.label(spec.model.dtype) + spec.deploy.label(),
        keep_codes=spec.deploy.needs_codes,
    )

    for ev in spec.evals:  # a missing eval dataset must not surface only after a long quantization
        ev.preflight()
        ev.check_model(model, tok)
    overlap = [ev.name for ev in spec.evals if out.calib is not None and ev.calibration_overlap(out.calib)]
    if overlap:  # test-set calibration (SmoothQuant+ does it on purpose): flagged in the record and every table
        assert out.calib is not None  # overlap needs it
        out.calib["calibrated_on_eval_set"] = overlap
        log.warning("the calibration set (%s) is drawn from the items of %s: results are flagged "
                    "calibrated_on_eval_set", out.calib.get("name"), overlap)
    reset_peak_cuda()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        result = wakv_step.quantize(quantizer, model, calib, ctx)
    out.quant_time_s = round(time.perf_counter() - t0, 3)
    quant_rss = {f"quantize_{k}": v for k, v in rss.summary().items()}
    model = result.model
    out.quant_summary = {**result.summary, "method_label": ctx.method_label}
    if quantizer.format is not None:
        out.format = {**quantizer.format.to_dict(), "short_name": quantizer.format_label()}
        out.bits_per_weight = weighted_bits_per_weight(quantizer, model, result.quantized_layers)
    log.info("quantizer %s done in %.2fs (%d layers)", quantizer.name, out.quant_time_s, len(result.quantized_layers))
    if spec.save_artifacts and result.artifacts:
        path = save_artifacts(output_dir / ARTIFACTS_FILE, result.artifacts, quantizer.name, spec.quantizer.to_dict())
        out.quant_summary["artifacts_file"] = path.name
    if spec.deploy.needs_codes:  # exports written from the codes, then (deploy.pack) real low-bit layers
        out.quant_summary.update(deploy_result(spec.deploy, model, tok, result, output_dir, out))
    for name, rows in result.tables.items():
        extras.tables[name] = rows
    extras.images.update({k: str(v) for k, v in result.images.items()})
    if result.images:
        out.quant_summary["images"] = {k: Path(v).name for k, v in result.images.items()}

    if fp_weights is not None:
        # transforming methods (AWQ, SmoothQuant, SQ+) return the weights they actually rounded
        ref = result.reference_weights if result.reference_weights is not None else fp_weights
        ctx.fp_weights = {k: v for k, v in ref.items() if k in set(result.quantized_layers)}
        del fp_weights
    footprint = _footprint_metrics(quantizer, model, result.quantized_layers,  # before any forward (bnb may repack)
                                   packed=spec.deploy.pack or bool(loaded_label))
    for ev in spec.evals:
        t1 = time.perf_counter()
        res = ev.run(model, tok, ctx)
        if ev.name in overlap:
            for key in res.metrics:
                res.provenance.setdefault(key, {})["calibrated_on_eval_set"] = True
        _merge_eval(out, extras, ev, res, time.perf_counter() - t1)
    out.metrics.update(footprint.metrics)  # after the evals' metrics: the first metric stays an eval's
    out.provenance.update(footprint.provenance)
    note = out.model.get("note")
    if note:  # e.g. the demo model's "fp" weights are dequantized Q4_1: say so next to every number
        for prov in out.provenance.values():
            prov["model_note"] = note
    for name, rows in extras.tables.items():
        write_table(rows, output_dir, name)
    out.peak_memory = {**peak_memory(), **quant_rss}
    return extras


def run(record: RunRecord, output_dir: Path, build: Callable[[], RunSpec], config: dict[str, Any] | None = None
        ) -> RunRecord:
    """Build the spec, :func:`execute` it and write ``output_dir/result.json`` exactly once.

    ``record`` is the run's skeleton (id, experiment, overrides, seed, ``status="failed"``); ``build``
    makes the :class:`RunSpec` (the Hydra edge's config -> objects step), called here so that a bad
    config value is recorded as a failed run like any other error. ``status`` becomes ``ok`` only when
    everything finished; on any exception the error is recorded and the exception re-raised. ``config``:
    the resolved configuration the tracker logs with the run (default: the method's config).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tracker = Tracker()
    extras = RunExtras()
    try:
        spec = build()
        quantizer = build_quantizer(spec.quantizer)
        record.quantizer = {**record.quantizer, "name": quantizer.name, "config": spec.quantizer.to_dict()}
        record.variant = make_variant(spec)
        write_json_atomic(output_dir / VARIANT_FILE, record.variant)  # an interrupted run still names its variant
        tracker = make_tracker(spec.logger)
        tracker.start(run_id=record.run_id, experiment=record.experiment, quantizer=quantizer.name,
                      config=config if config is not None else record.quantizer["config"], output_dir=output_dir,
                      tags=record.tags)
        extras = execute(spec, output_dir, record, quantizer)
        record.status = "ok"
    except BaseException as e:
        user_err = find_quantlab_error(e)
        record.error = {"type": type(user_err or e).__name__, "message": str(user_err or e) or type(e).__name__,
                        "traceback": traceback.format_exc()}
        if not record.peak_memory:
            record.peak_memory = peak_memory()
        raise
    finally:
        record.env = capture_env(record.model.get("device"))
        record.finished_at = utc_now_iso()
        record.wall_s = round(time.perf_counter() - t0, 3)
        write_record(record, output_dir)
        try:
            tracker.log_result(record, extras.tables, extras.images)
            tracker.finish(record.status == "ok")
        except Exception:  # tracking must never turn a finished run into a failure
            log.exception("experiment tracker failed")
    log.info("run %s: %s -> %s", record.run_id, record.status, output_dir / "result.json")
    return record
