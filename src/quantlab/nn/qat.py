"""LLM-QAT fake quantization with a straight-through estimator (Liu et al. 2023, "LLM-QAT: Data-Free
Quantization Aware Training for Large Language Models", section 2.2).

Symmetric MinMax quantization, Eq. (3)::

    alpha = max|X_R| / (2^(N-1) - 1),     X_Q = alpha * round(X_R / alpha)

with ``max`` taken per output channel for weights, per token for Linear inputs and per token (over all
heads jointly, before RoPE: on the k_proj / v_proj outputs) for the KV cache. Nothing is clipped in
the forward pass (MinMax keeps the outliers, which the paper finds essential).

Where the public code (facebookresearch/LLM-QAT ``models/utils_quant.py``) differs from the paper,
both are available and the choice is recorded:

* ``arith="paper"``: Eq. (3) as written. ``arith="code"``: the code's ``s = (2^(N-1)-1)/(max+1e-6)``,
  ``X_Q = round(X_R * s) / (s + 1e-6)`` (differs by the epsilons only).
* ``ste_clip=None``: the plain straight-through estimator (gradient passed unchanged). ``ste_clip=2.0``:
  the code's backward, which zeroes the gradient where ``|X_R| >= 2`` (a fixed bound, not the
  quantizer range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.formats.wakv import FULL

ARITHS = ("paper", "code")
_EPS = 1e-6  # the reference code's epsilon


def sym_minmax_fake_quant(x: torch.Tensor, bits: int, dim: int = -1, arith: str = "paper") -> torch.Tensor:
    """Eq. (3): symmetric MinMax fake quantization with one scale per slice along ``dim`` (the
    reduction runs over ``dim``: ``dim=-1`` gives one scale per row / token). Computed in float32
    (float64 stays float64), returned in ``x``'s dtype. ``bits >= 16`` returns ``x`` unchanged."""
    if bits >= FULL:
        return x
    qmax = 2 ** (bits - 1) - 1
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    amax = xf.detach().abs().amax(dim=dim, keepdim=True)
    if arith == "paper":
        alpha = amax / qmax
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))  # an all-zero slice stays zero
        out = torch.round(xf / alpha) * alpha
    elif arith == "code":
        s = qmax / (amax + _EPS)
        out = torch.round(xf * s) / (s + _EPS)
    else:
        raise ValueError(f"arith must be one of {ARITHS}, got {arith!r}")
    return out.to(x.dtype)


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized tensor. Backward: the incoming gradient, zeroed where
    ``|x| >= clip`` when a clip is given (the reference code's rule)."""

    @staticmethod
    def forward(ctx, x, bits, dim, arith, clip):  # noqa: D102
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(x)
        return sym_minmax_fake_quant(x, bits, dim, arith)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.clip is None:
            return grad, None, None, None, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < ctx.clip).to(grad.dtype), None, None, None, None


def ste_fake_quant(x: torch.Tensor, bits: int, dim: int = -1, arith: str = "paper",
                   ste_clip: float | None = None) -> torch.Tensor:
    """:func:`sym_minmax_fake_quant` with a straight-through gradient (identity when ``bits >= 16``)."""
    if bits >= FULL:
        return x
    return _STE.apply(x, bits, dim, arith, ste_clip)


@dataclass(frozen=True)
class QATSpec:
    """Bits and quantizer choices of one QAT Linear.

    Attributes:
        w_bits: weight bits (per output channel); 16 = not quantized.
        a_bits: input-activation bits (per token); 16 = not quantized.
        out_bits: output bits (per token), used for k_proj / v_proj = the KV cache; 16 = off.
        arith: ``paper`` (Eq. 3) or ``code`` (the reference implementation's epsilons).
        ste_clip: ``None`` (plain STE) or the reference code's fixed gradient bound (2.0).
    """

    w_bits: int = FULL
    a_bits: int = FULL
    out_bits: int = FULL
    arith: str = "paper"
    ste_clip: float | None = None


class QATLinear(nn.Linear):
    """An ``nn.Linear`` (same weight/bias Parameters) computing ``Q_out(Q_a(x) @ Q_w(W)^T + b)``, each
    Q a per-channel / per-token symmetric MinMax fake quantizer with a straight-through gradient."""

    spec: QATSpec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QATSpec) -> QATLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  dtype=linear.weight.dtype)
        new.weight, new.bias, new.spec = linear.weight, linear.bias, spec
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        w = ste_fake_quant(self.weight, s.w_bits, -1, s.arith, s.ste_clip)  # per output channel (row)
        y = F.linear(ste_fake_quant(x, s.a_bits, -1, s.arith, s.ste_clip), w, self.bias)
        return ste_fake_quant(y, s.out_bits, -1, s.arith, s.ste_clip)  # per token, all heads jointly

    def extra_repr(self) -> str:
        s = self.spec
        return f"{super().extra_repr()}, w{s.w_bits} a{s.a_bits} out{s.out_bits}, {s.arith}, ste_clip={s.ste_clip}"


def swap_qat(model: nn.Module, names: list[str], kv_names: set[str], w_bits: int, a_bits: int, kv_bits: int,
             arith: str = "paper", ste_clip: float | None = None) -> list[str]:
    """Replace each named Linear by a :class:`QATLinear` sharing its parameters: weights at ``w_bits``,
    inputs at ``a_bits``, and for the names in ``kv_names`` (k_proj / v_proj) outputs at ``kv_bits``.
    Returns the swapped names. The model stays a stock HF model (``isinstance(m, nn.Linear)`` holds)."""
    from quantlab.nn.swap import replace_module

    if arith not in ARITHS:
        raise ValueError(f"arith must be one of {ARITHS}, got {arith!r}")
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear) or isinstance(mod, QATLinear):
            raise TypeError(f"{name} is a {type(mod).__name__}, not a plain nn.Linear")
        spec = QATSpec(w_bits, a_bits, kv_bits if name in kv_names else FULL, arith, ste_clip)
        replace_module(model, name, QATLinear.from_linear(mod, spec))
        done.append(name)
    return done
