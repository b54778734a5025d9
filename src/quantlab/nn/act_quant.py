"""Fake activation quantization on Linear inputs: the "A8" of SmoothQuant W8A8.

Symmetric absmax integer quantization as in the reference ``mit-han-lab/smoothquant``
``smoothquant/fake_quant.py`` (``quantize_activation_per_token_absmax`` / ``..._per_tensor_absmax``),
computed dynamically on every forward::

    s = max(max|x|, 1e-5) / (2^(b-1) - 1)        (per token: max over the last dim; per tensor: over all)
    x_hat = round(x / s) * s                      (round half to even, torch.round)

``|x / s| <= 2^(b-1) - 1`` by construction, so no clamp is needed (the reference has none either).
Math runs in float32 (float64 stays float64) and the result is cast back to ``x``'s dtype.

:class:`ActQuantLinear` is an ``nn.Linear`` subclass sharing the original layer's weight and bias, so
the model stays a stock Hugging Face model with swapped modules (``isinstance(m, nn.Linear)`` holds).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.nn.swap import replace_module

GRANULARITIES = ("per_token", "per_tensor")
SCALE_FLOOR = 1e-5  # smoothquant fake_quant.py: scales.clamp_(min=1e-5) before dividing by q_max


def _qmax(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be in [2, 16], got {bits}")
    return 2 ** (bits - 1) - 1


def _fake_quant(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    dt = torch.promote_types(x.dtype, torch.float32)
    s = amax.to(dt).clamp(min=SCALE_FLOOR) / _qmax(bits)
    return (torch.round(x.to(dt) / s) * s).to(x.dtype)


def quantize_per_token_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization: one scale per row of ``x`` (..., channels)."""
    return _fake_quant(x, x.detach().abs().amax(dim=-1, keepdim=True), bits)


def quantize_per_tensor_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-tensor symmetric fake quantization: one scale for the whole tensor."""
    return _fake_quant(x, x.detach().abs().amax(), bits)


def quantize_absmax(x: torch.Tensor, bits: int = 8, granularity: str = "per_token") -> torch.Tensor:
    """:func:`quantize_per_token_absmax` or :func:`quantize_per_tensor_absmax` by name."""
    if granularity == "per_token":
        return quantize_per_token_absmax(x, bits)
    if granularity == "per_tensor":
        return quantize_per_tensor_absmax(x, bits)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


class ActQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose input is fake-quantized (symmetric absmax, dynamic) on every forward.

    Attributes:
        act_bits: activation bits (8 for W8A8).
        granularity: ``per_token`` or ``per_tensor``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_bits: int = 8,
                 granularity: str = "per_token", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        _qmax(act_bits)
        self.act_bits = act_bits
        self.granularity = granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_bits: int = 8, granularity: str = "per_token") -> ActQuantLinear:
        """A swapped module sharing ``linear``'s weight and bias Parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, act_bits=act_bits,
                  granularity=granularity, device="meta", dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_absmax(x, self.act_bits, self.granularity), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.act_bits}, granularity={self.granularity}"


def swap_act_quant(model: nn.Module, names: Iterable[str], act_bits: int = 8, granularity: str = "per_token") -> list[str]:
    """Replace each named ``nn.Linear`` with an :class:`ActQuantLinear` sharing its parameters.

    Layers that already are :class:`ActQuantLinear` are left alone. Returns the swapped names.
    """
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, ActQuantLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is a {type(mod).__name__}, not an nn.Linear")
        replace_module(model, name, ActQuantLinear.from_linear(mod, act_bits, granularity))
        done.append(name)
    return done
