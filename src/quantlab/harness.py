"""One run, on typed objects only: load -> (calibrate) -> quantize -> evaluate -> facts for the record.

:mod:`quantlab.pipeline` turns the Hydra config into a :class:`RunSpec` and owns records and error
handling; this module never sees Hydra.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.calib.datasets import CalibConfig, build_calib
from quantlab.deploy.config import DeployConfig, check_exports_early, check_packable
from quantlab.deploy.run import deploy_result, loaded_format, packed_footprint, prepare_loaded
from quantlab.errors import ConfigError
from quantlab.evals.base import Evaluator
from quantlab.metrics.footprint import GB, model_footprint, packed_estimate
from quantlab.models.loaders import LoadedModel, ModelConfig, load_model
from quantlab.models.offload import check_offloadable
from quantlab.nn.swap import iter_linears
from quantlab.quantizers.artifacts import ARTIFACTS_FILE, save_artifacts
from quantlab.quantizers.base import Quantizer, QuantizerConfig, build_quantizer, quantizer_class
from quantlab.tracking.env import peak_memory, reset_peak_cuda
from quantlab.tracking.rss import RssSampler
from quantlab.tracking.record import write_table
from quantlab.types import CalibData, EvalResult, RunContext
from quantlab.utils.hashing import fingerprint
from quantlab.utils.torch_utils import resolve_device, resolve_dtype, seed_everything

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
        save_artifacts: write the quantizer's artifacts to ``artifacts.safetensors``.
        deploy: pack the quantized model into real low-bit layers and/or export checkpoints.
    """

    model: ModelConfig
    quantizer: QuantizerConfig
    calib: CalibConfig | None = None
    evals: tuple[Evaluator, ...] = ()
    seed: int = 0
    save_artifacts: bool = False
    deploy: DeployConfig = field(default_factory=DeployConfig)


@dataclass
class RunOutcome:
    """Facts gathered while running; the pipeline copies them into the run record."""

    model_info: dict[str, Any] = field(default_factory=dict)
    quantizer_name: str = ""
    format: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    calib: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_item: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    quant_summary: dict[str, Any] = field(default_factory=dict)
    quant_time_s: float | None = None
    images: dict[str, str] = field(default_factory=dict)
    peak_memory: dict[str, Any] = field(default_factory=dict)


def weighted_bits_per_weight(quantizer: Quantizer, model: nn.Module, layers: list[str]) -> float | None:
    """Storage bits per weight over the quantized Linears (weighted by their weight counts)."""
    fmt = quantizer.format
    if fmt is None or not layers:
        return None
    total = bits = 0.0
    for name in layers:
        mod = model.get_submodule(name)
        n = mod.in_features * mod.out_features  # not weight.numel(): bitsandbytes packs 2 codes per byte
        total += n
        bits += n * fmt.bits_per_weight(mod.in_features)
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
        bpw = {n: fmt.bits_per_weight(model.get_submodule(n).in_features) for n in layers}
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
    dtype = torch.float32 if dtype == "auto" else dtype
    quantizer.prepare(resolve_device(spec.model.device), dtype)
    seed_everything(spec.seed)
    return load_model(spec.model, quantization_config=quantizer.load_config(dtype)), fp_weights


def _merge_eval(out: RunOutcome, ev: Evaluator, res: EvalResult, wall_s: float) -> None:
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
        out.tables[name] = rows
    out.images.update({k: str(v) for k, v in res.images.items()})


def execute(spec: RunSpec, output_dir: Path, out: RunOutcome | None = None) -> RunOutcome:
    """Run one experiment described by ``spec``; files go below ``output_dir``.

    Facts are written into ``out`` as they become known, so a caller that passes its own
    :class:`RunOutcome` keeps them (model, calibration, ...) even when a later step raises.
    """
    out = out if out is not None else RunOutcome()
    seed_everything(spec.seed)
    quantizer = build_quantizer(spec.quantizer)
    out.quantizer_name = quantizer.name
    if spec.deploy.needs_codes:
        check_packable(quantizer, "deploy.pack" if spec.deploy.pack else "deploy.export")
        check_exports_early(quantizer, spec.deploy.export)
    if spec.model.offload is not None:
        check_offloadable(quantizer, spec.deploy.needs_codes)
    loaded, fp_weights = _load(spec, quantizer)
    model, tok = loaded.model, loaded.tokenizer
    out.model_info = loaded.info
    loaded_label = prepare_loaded(loaded, quantizer, spec.deploy)  # an exported checkpoint: packed layers
    if loaded_label:
        out.format, out.bits_per_weight = loaded_format(model, loaded.info["packed_checkpoint"])
    quantizer.validate(model)

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
        out.calib["calibrated_on_eval_set"] = overlap
        log.warning("the calibration set (%s) is drawn from the items of %s: results are flagged "
                    "calibrated_on_eval_set", out.calib.get("name"), overlap)
    reset_peak_cuda()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        result = quantizer.apply(model, calib, ctx)
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
        out.tables[name] = rows
    out.images.update({k: str(v) for k, v in result.images.items()})
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
        _merge_eval(out, ev, res, time.perf_counter() - t1)
    out.metrics.update(footprint.metrics)  # after the evals' metrics: the first metric stays an eval's
    out.provenance.update(footprint.provenance)
    note = out.model_info.get("note")
    if note:  # e.g. the demo model's "fp" weights are dequantized Q4_1: say so next to every number
        for prov in out.provenance.values():
            prov["model_note"] = note
    for name, rows in out.tables.items():
        write_table(rows, output_dir, name)
    out.peak_memory = {**peak_memory(), **quant_rss}
    return out
