"""Round-to-nearest (RTN): group-wise min/max fake quantization of every selected Linear.

With a codebook format (``kind: nf4`` / ``fp4``) RTN is the reference NF4/FP4 fake quantization of
bitsandbytes' data types (blocks of ``group_size`` absmax-scaled values, nearest codebook entry,
optional double quantization; :mod:`quantlab.formats.nf4`): ``quantizer=nf4_ref`` / ``fp4_ref``.

The baseline of every weight-quantization paper (GPTQ "RTN", AWQ "RTN", SmoothQuant+ Table 1 "RTN").
Each weight group gets min/max parameters (:func:`quantlab.formats.affine.choose_qparams`) and is
rounded to the nearest grid point; the dequantized weight replaces the original in the model's dtype
(fake quantization, for accuracy studies). Integer codes, scales and zero points are returned as
artifacts so the result can be re-applied or packed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from quantlab.calib.sequential import on_device
from quantlab.formats import affine
from quantlab.formats.codes import QuantizedWeight, from_format
from quantlab.formats.nf4 import (
    dequantize_codebook,
    double_dequantize_absmax,
    double_quantize_absmax,
    quantize_codebook,
)
from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RTNConfig(QuantizerConfig):
    """RTN settings.

    Attributes:
        format: the weight format (bits, group size, symmetry).
        save_codes: also return integer codes/scales/zeros as artifacts (RTN is deterministic,
            so they are only needed for packing; off by default to save memory on big models).
    """

    format: QuantFormat = field(default_factory=QuantFormat)
    save_codes: bool = False

    execution_fields: ClassVar[tuple[str, ...]] = ("save_codes",)  # what is saved, not what is computed


@register_quantizer("rtn", RTNConfig)
class RTNQuantizer(Quantizer[RTNConfig]):
    """Replaces each selected Linear's weight by its RTN fake-quantized value."""

    supported_kinds = ("int", "nf4", "fp4")
    offloadable = True
    packable = True  # int formats (a codebook format is bitsandbytes' own: refused by quantlab.deploy)

    @staticmethod
    def _codebook(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """nf4/fp4: blocks of ``group_size`` consecutive input channels of a row (= bitsandbytes'
        blocks of the flattened weight, since ``group_size`` divides ``in_features``)."""
        codes, absmax = quantize_codebook(w, fmt.kind, fmt.group_size)
        extra = {"absmax": absmax}
        if fmt.double_quant:
            c2, a2, offset = double_quantize_absmax(absmax)
            absmax = double_dequantize_absmax(c2, a2, offset)
            extra = {"absmax_codes": c2, "absmax2": a2, "absmax_offset": torch.tensor([offset])}
        return dequantize_codebook(codes, absmax, fmt.kind, fmt.group_size), {"codes": codes, **extra}

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        fmt = self.config.format
        done: list[str] = []
        artifacts: dict[str, torch.Tensor] = {}
        codes: dict[str, QuantizedWeight] | None = {} if ctx.keep_codes and not fmt.is_codebook else None
        for name, mod in self.target_linears(model):
            with on_device([mod], ctx.device):  # an offloaded Linear is read, changed and written back
                self._quantize_linear(name, mod, fmt, artifacts, codes)
            done.append(name)
        log.info("RTN %s: quantized %d Linear layers", fmt.short_name(), len(done))
        return QuantResult(model=model, quantized_layers=done, artifacts=artifacts, summary={"n_layers": len(done)},
                           codes=codes)

    def _quantize_linear(self, name: str, mod: nn.Linear, fmt: QuantFormat, artifacts: dict[str, torch.Tensor],
                         codes: dict[str, QuantizedWeight] | None) -> None:
        w = mod.weight.data
        if fmt.is_codebook:
            deq, parts = self._codebook(w, fmt)
            mod.weight.data.copy_(deq.to(w.dtype))
            if self.config.save_codes:
                artifacts.update({f"{name}.{k}": v.cpu() for k, v in parts.items()})
            return
        q, scale, zero = affine.quantize_weight(w, fmt)
        mod.weight.data.copy_(affine.dequantize(q, scale, zero, fmt).to(w.dtype))
        if self.config.save_codes:
            artifacts[f"{name}.qweight"] = q.cpu()
            artifacts[f"{name}.scales"] = scale.to(torch.float32).cpu()
            artifacts[f"{name}.zeros"] = zero.to(torch.uint8).cpu()
        if codes is not None:
            codes[name] = from_format(q.cpu(), scale.cpu(), zero.cpu(), fmt)  # CPU: off the accelerator
