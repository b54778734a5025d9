"""Fake activation quantization on Linear inputs (the "A8" of SmoothQuant W8A8).

Symmetric absmax int quantization as in ``mit-han-lab/smoothquant`` ``fake_quant.py``:
``s = max|x| / (2^(b-1) - 1)`` (clamped to >= 1e-5), ``x_hat = round(x / s) * s`` with round half to
even, computed dynamically on every forward, per token (max over the last dim) or per tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.nn.swap import replace_module

GRANULARITIES = ("per_token", "per_tensor")
SCALE_FLOOR = 1e-5


def quantize_absmax(x: torch.Tensor, bits: int = 8, granularity: str = "per_token") -> torch.Tensor:
    """Symmetric absmax fake quantization of activations ``x`` (..., channels); returns x's dtype."""
    qmax = 2 ** (bits - 1) - 1
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    if granularity == "per_token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    elif granularity == "per_tensor":
        amax = xf.abs().amax()
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    s = (amax / qmax).clamp(min=SCALE_FLOOR)
    return (torch.round(xf / s).clamp(-qmax, qmax) * s).to(x.dtype)


class ActQuantLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, shared) whose input is fake-quantized on every forward."""

    act_bits: int
    granularity: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_bits: int = 8, granularity: str = "per_token") -> ActQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.act_bits, new.granularity = act_bits, granularity
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_absmax(x, self.act_bits, self.granularity), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}, granularity={self.granularity}"


def swap_act_quant(model: nn.Module, names: list[str], act_bits: int, granularity: str) -> None:
    """Replace each named Linear with an :class:`ActQuantLinear` sharing its parameters."""
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, ActQuantLinear):
            replace_module(model, name, ActQuantLinear.from_linear(mod, act_bits, granularity))
