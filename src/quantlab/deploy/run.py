"""The run's deploy steps: exports and packing after a method ran, and packed checkpoints loaded as models."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from quantlab.deploy.config import DeployConfig
from quantlab.deploy.export import check_export, write_checkpoint
from quantlab.errors import ConfigError
from quantlab.metrics.footprint import GB, model_footprint
from quantlab.nn.packed import pack_linears, packed_modules, set_backend
from quantlab.tracking.record import RunRecord
from quantlab.types import EvalResult, QuantResult

log = logging.getLogger(__name__)

EXPORT_DIR = "export"


def prepare_loaded(loaded: Any, quantizer: Any, deploy: DeployConfig) -> str | None:
    """For a model loaded from an exported checkpoint: check the run, switch its layers to ``deploy.backend``
    and return its method label (the exporting run's label + format and backend); None for other models."""
    pc = loaded.info.get("packed_checkpoint")
    if pc is None:
        return None
    if not quantizer.is_identity:
        raise ConfigError("quantizer", f"model.path holds a {pc['format']} checkpoint, already quantized: use "
                                       "quantizer=none")
    if deploy.needs_codes:
        raise ConfigError("deploy.pack" if deploy.pack else "deploy.export",
                          "the model is loaded from an exported checkpoint: it is already packed")
    set_backend(loaded.model, deploy.backend)
    exp = pc.get("export") or {}
    base = exp.get("method_label") or f"{pc['format']} w{pc['bits']}g{pc['group_size']}"
    return f"{base} [{pc['format']} export, {deploy.backend}]"


def loaded_format(model: nn.Module, pc: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """The record's ``format`` and bits per weight of a model loaded from a packed checkpoint ``pc``."""
    from quantlab.formats.spec import QuantFormat

    fmt = QuantFormat(bits=pc["bits"], group_size=pc["group_size"], symmetric=pc["symmetric"])
    mods = [m for _, m in packed_modules(model)]
    total = sum(m.in_features * m.out_features for m in mods)
    bits = sum(m.in_features * m.out_features * fmt.bits_per_weight(m.in_features) for m in mods)
    return {**fmt.to_dict(), "short_name": fmt.short_name(), "checkpoint_format": pc["format"]}, (
        bits / total if total else None)


def deploy_result(deploy: DeployConfig, model: nn.Module, tokenizer: Any, result: QuantResult, output_dir: Path,
                  outcome: RunRecord) -> dict[str, Any]:
    """Write ``deploy.export``'s checkpoints from the method's codes, then (``deploy.pack``) replace the quantized
    Linears by packed ones. Returns the summary entries for the record."""
    codes = result.codes
    if codes is None or set(codes) != set(result.quantized_layers):
        raise RuntimeError("the method did not return the codes of every quantized Linear")
    for fmt in deploy.export:  # every format checked before anything is written
        check_export(fmt, codes)
    label = str(outcome.quant_summary.get("method_label", "")).removesuffix(deploy.label())
    exports = {}
    for fmt in deploy.export:
        meta = {"method_label": label, "run_dir": str(output_dir), "format_spec": outcome.format,
                "quantizer": outcome.quantizer.get("name"), "model": outcome.model.get("name")}
        exports[fmt] = str(write_checkpoint(model, tokenizer, codes, output_dir / EXPORT_DIR / fmt, fmt, meta))
    summary: dict[str, Any] = {"pack": deploy.pack, "backend": deploy.backend if deploy.pack else None,
                               "exports": exports}
    if deploy.pack:
        summary["packed_layers"] = len(pack_linears(model, codes, deploy.backend))
    return {"deploy": summary}


def packed_footprint(model: nn.Module, out: EvalResult) -> EvalResult:
    """``memory/footprint_gb`` of a packed model, measured from the tensors it holds (codes, scales, zero
    points, the backend's workspace, everything not quantized)."""
    fp = model_footprint(model)
    mods = packed_modules(model)
    persistent = sum(b.nelement() * b.element_size() for _, m in mods for n, b in m.named_buffers(recurse=False)
                     if not n.startswith("ws_"))
    workspace = sum(b.nelement() * b.element_size() for _, m in mods for n, b in m.named_buffers(recurse=False)
                    if n.startswith("ws_"))
    out.metrics["memory/footprint_gb"] = fp.total / GB
    out.provenance["memory/footprint_gb"] = {
        "protocol": "measured: params + buffers of the packed model, each storage once (packed codes, scales, "
                    "zero points, the backend's workspace, and every tensor left unquantized)",
        **fp.describe(), "packed_layers": len(mods), "packed_weight_bytes": persistent,
        "backend_workspace_bytes": workspace, "backend": mods[0][1].backend if mods else None,
    }
    return out
