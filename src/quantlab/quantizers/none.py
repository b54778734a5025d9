"""The full-precision baseline, run through the same pipeline and record path as every method."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext


@dataclass(frozen=True)
class NoneConfig(QuantizerConfig):
    """Identity quantizer.

    Attributes:
        format: accepted so that sweeps over ``quantizer.format.*`` can include the baseline
            (``quantizer=none,rtn quantizer.format.group_size=32,64``); it is never applied and the
            run records no format.
    """

    format: QuantFormat | None = None


@register_quantizer("none", NoneConfig)
class NoneQuantizer(Quantizer[NoneConfig]):
    """Leaves the model untouched."""

    is_identity = True
    offloadable = True

    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        return QuantResult(model=model, quantized_layers=[], summary={"n_layers": 0})
