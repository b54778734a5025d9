"""Symmetric absmax fake quantization of weights, Linear inputs and outputs: LLM-QAT's (Liu et al. 2023,
"LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", section 2.2, with a
straight-through estimator) and SmoothQuant's dynamic activation quantizer (its "A8"), one implementation.

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

* ``arith="smoothquant"``: SmoothQuant's ``smoothquant/fake_quant.py``
  (``quantize_activation_per_token_absmax`` / ``..._per_tensor_absmax``): ``s = max(max|x|, 1e-5) / qmax``,
  ``X_Q = round(X_R / s) * s`` (Eq. 3 with a floor on the range instead of leaving all-zero slices alone).
  ``dim=None`` takes one scale over the whole tensor (SmoothQuant's ``per_tensor``).

The clipping variants of the paper's ablation (Table 4) are options: ``w_quant="statsq"`` (weights
clipped at a statistic of each output channel, :func:`statsq_fake_quant`) and ``a_quant="lsq"``
(Linear inputs clipped at a learned step size, :func:`lsq_fake_quant`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.formats.wakv import FULL

ARITHS = ("paper", "code", "smoothquant")
GRANULARITIES = ("per_token", "per_tensor")  # Linear-input scales: one per token (row) or one per tensor
SMOOTHQUANT_FLOOR = 1e-5  # smoothquant fake_quant.py: scales.clamp_(min=1e-5) before dividing by q_max
W_QUANTS = ("minmax", "statsq")
A_QUANTS = ("minmax", "lsq")
_EPS = 1e-6  # the reference code's epsilon


def sym_minmax_fake_quant(x: torch.Tensor, bits: int, dim: int | None = -1, arith: str = "paper") -> torch.Tensor:
    """Eq. (3): symmetric MinMax fake quantization with one scale per slice along ``dim`` (the
    reduction runs over ``dim``: ``dim=-1`` gives one scale per row / token; ``None`` one for the whole
    tensor). Computed in float32 (float64 stays float64), returned in ``x``'s dtype. ``bits >= 16``
    returns ``x`` unchanged. ``arith``: see the module docstring."""
    if bits >= FULL:
        return x
    qmax = 2 ** (bits - 1) - 1
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    ax = xf.detach().abs()
    amax = ax.amax() if dim is None else ax.amax(dim=dim, keepdim=True)
    if arith == "smoothquant":
        s = amax.clamp(min=SMOOTHQUANT_FLOOR) / qmax
        out = torch.round(xf / s) * s
    elif arith == "paper":
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
    def forward(ctx, x, bits, dim, arith, clip):
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(x)
        return sym_minmax_fake_quant(x, bits, dim, arith)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip is None:
            return grad, None, None, None, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < ctx.clip).to(grad.dtype), None, None, None, None


def ste_fake_quant(x: torch.Tensor, bits: int, dim: int | None = -1, arith: str = "paper",
                   ste_clip: float | None = None) -> torch.Tensor:
    """:func:`sym_minmax_fake_quant` with a straight-through gradient (identity when ``bits >= 16``)."""
    if bits >= FULL:
        return x
    return _STE.apply(x, bits, dim, arith, ste_clip)


def statsq_fake_quant(w: torch.Tensor, bits: int, k: float = 2.0) -> torch.Tensor:
    """Statistics-based clipping of weights (the "StatsQ" arm of Table 4), per output channel::

        c = k * mean|W_row|,    alpha = c / (2^(N-1) - 1),    W_Q = alpha * round(clip(W, -c, c) / alpha)

    The paper cites StatsQ (Liu et al. 2022a) without restating its multi-bit rule, and the public
    code has only its 2-bit form (``s = 2 mean|W|`` per row); quantlab uses that statistic as the
    clipping threshold at every bit width, with the multiplier ``k`` configurable. Gradient: straight
    through inside ``[-c, c]``, zero outside (``c`` is a statistic, not trained)."""
    if bits >= FULL:
        return w
    qmax = 2 ** (bits - 1) - 1
    dt = torch.promote_types(w.dtype, torch.float32)
    wf = w.to(dt)
    c = (k * wf.detach().abs().mean(dim=-1, keepdim=True)).clamp_min(1e-8)
    wc = torch.maximum(torch.minimum(wf, c), -c)
    alpha = c / qmax
    q = torch.round(wc / alpha) * alpha
    return (wc + (q - wc).detach()).to(w.dtype)


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Learned step size quantization (Esser et al. 2019, "LSQ"), the activation arm of Table 4::

        x_Q = s * round(clip(x / s, -2^(N-1), 2^(N-1) - 1))

    with one trained step ``s`` per Linear input; ``round`` has a straight-through gradient and the
    gradient of ``s`` is scaled by ``g = 1 / sqrt(n_features * (2^(N-1) - 1))`` (LSQ section 2.2)."""
    if bits >= FULL:
        return x
    qp, qn = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    g = 1.0 / math.sqrt(x.shape[-1] * qp)
    s = step * g + (step - step * g).detach()  # value: step; gradient: g * dL/ds
    v = torch.clamp(x.float() / s, -qn, qp)
    v = v + (torch.round(v) - v).detach()
    return (v * s).to(x.dtype)


@dataclass(frozen=True)
class QATSpec:
    """Bits and quantizer choices of one QAT Linear.

    Attributes:
        w_bits: weight bits (per output channel); 16 = not quantized.
        a_bits: input-activation bits (per token); 16 = not quantized.
        out_bits: output bits (per token), used for k_proj / v_proj = the KV cache; 16 = off.
        arith: ``paper`` (Eq. 3), ``code`` (the reference implementation's epsilons) or ``smoothquant``
            (SmoothQuant's A8: a 1e-5 floor on the range).
        a_granularity: input scales ``per_token`` (LLM-QAT; SmoothQuant's Llama setting) or ``per_tensor``.
        ste_clip: ``None`` (plain STE) or the reference code's fixed gradient bound (2.0).
        w_quant: ``minmax`` (Eq. 3, the paper's choice) or ``statsq`` (clipped at ``statsq_k * mean|W|``).
        a_quant: ``minmax`` (Eq. 3) or ``lsq`` (learned step size; needs training to mean anything).
        statsq_k: the StatsQ clipping multiplier.
    """

    w_bits: int = FULL
    a_bits: int = FULL
    out_bits: int = FULL
    arith: str = "paper"
    a_granularity: str = "per_token"
    ste_clip: float | None = None
    w_quant: str = "minmax"
    a_quant: str = "minmax"
    statsq_k: float = 2.0

    def __post_init__(self) -> None:
        if self.arith not in ARITHS:
            raise ValueError(f"arith must be one of {ARITHS}, got {self.arith!r}")
        if self.w_quant not in W_QUANTS:
            raise ValueError(f"w_quant must be one of {W_QUANTS}, got {self.w_quant!r}")
        if self.a_quant not in A_QUANTS:
            raise ValueError(f"a_quant must be one of {A_QUANTS}, got {self.a_quant!r}")
        if self.a_granularity not in GRANULARITIES:
            raise ValueError(f"a_granularity must be one of {GRANULARITIES}, got {self.a_granularity!r}")


class QATLinear(nn.Linear):
    """An ``nn.Linear`` (same weight/bias Parameters) computing ``Q_out(Q_a(x) @ Q_w(W)^T + b)``, each
    Q a per-channel / per-token symmetric MinMax fake quantizer with a straight-through gradient (or a
    clipping variant of Table 4, per :class:`QATSpec`).

    With ``a_quant="lsq"`` the layer owns a scalar Parameter ``act_step``, set on the first forward to
    LSQ's initialisation ``2 mean|x| / sqrt(2^(N-1) - 1)`` (``act_step_ready`` records that it was)."""

    spec: QATSpec
    act_step: nn.Parameter
    act_step_ready: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QATSpec) -> QATLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  dtype=linear.weight.dtype)
        new.weight, new.bias, new.spec = linear.weight, linear.bias, spec
        if spec.a_quant == "lsq" and spec.a_bits < FULL:
            dev = linear.weight.device
            new.act_step = nn.Parameter(torch.ones((), device=dev, dtype=torch.float32))
            new.register_buffer("act_step_ready", torch.zeros((), dtype=torch.bool, device=dev))
        new.train(linear.training)
        return new

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.a_quant == "lsq" and s.a_bits < FULL:
            if not bool(self.act_step_ready):
                with torch.no_grad():
                    self.act_step.fill_(2 * x.detach().abs().float().mean() / math.sqrt(2 ** (s.a_bits - 1) - 1))
                    self.act_step_ready.fill_(True)
            return lsq_fake_quant(x, self.act_step, s.a_bits)
        return ste_fake_quant(x, s.a_bits, -1 if s.a_granularity == "per_token" else None, s.arith, s.ste_clip)

    def _quant_weight(self) -> torch.Tensor:
        s = self.spec
        if s.w_quant == "statsq":
            return statsq_fake_quant(self.weight, s.w_bits, s.statsq_k)
        return ste_fake_quant(self.weight, s.w_bits, -1, s.arith, s.ste_clip)  # per output channel (row)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer multiplies with (W-bit fake-quantized), detached."""
        return self._quant_weight().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        y = F.linear(self._quant_input(x), self._quant_weight(), self.bias)
        return ste_fake_quant(y, s.out_bits, -1, s.arith, s.ste_clip)  # per token, all heads jointly

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{super().extra_repr()}, w{s.w_bits} ({s.w_quant}) a{s.a_bits} ({s.a_quant}, {s.a_granularity}) "
                f"out{s.out_bits}, {s.arith}, ste_clip={s.ste_clip}")


def kv_linear_names(model: nn.Module) -> set[str]:
    """Full names of the k_proj / v_proj Linears of every block (from the architecture mapping)."""
    from quantlab.models.mappings import get_mapping

    mapping = get_mapping(model)
    return {f"{mapping.block_name(i)}.{r}" for i in range(len(mapping.blocks(model))) for r in mapping.kv}


def swap_wakv(model: nn.Module, targets: list[str], kv_names: set[str], w_bits: int, a_bits: int, kv_bits: int,
              **spec: Any) -> list[str]:
    """Swap Linears for :class:`QATLinear` sharing their parameters: every name in ``targets`` gets
    weights at ``w_bits`` and inputs at ``a_bits``; every name in ``kv_names`` (k_proj / v_proj, targets
    or not: the KV cache is quantized wherever its weights are) gets outputs at ``kv_bits``. ``spec``:
    further :class:`QATSpec` fields. Returns the swapped names, sorted. The model stays a stock HF
    model (``isinstance(m, nn.Linear)`` holds).

    PTQ methods pass ``w_bits=16``: their weights are already on their grid, only activations and the
    KV cache are added."""
    from quantlab.nn.swap import replace_module

    tset = set(targets)
    done = []
    for name in sorted(tset | (set(kv_names) if kv_bits < FULL else set())):
        mod = model.get_submodule(name)
        if not _is_plain_hf_linear(mod):
            raise TypeError(f"{name} is a {type(mod).__name__}, not a plain nn.Linear (already swapped?)")
        q = QATSpec(w_bits if name in tset else FULL, a_bits if name in tset else FULL,
                    kv_bits if name in kv_names else FULL, **spec)
        replace_module(model, name, QATLinear.from_linear(mod, q))
        done.append(name)
    return done


def _is_plain_hf_linear(mod: nn.Module) -> TypeGuard[nn.Linear]:
    """An ``nn.Linear`` subclass that adds no forward of its own (none of quantlab's swapped layers)."""
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def swap_qat(model: nn.Module, names: list[str], kv_names: set[str], w_bits: int, a_bits: int, kv_bits: int,
             arith: str = "paper", ste_clip: float | None = None) -> list[str]:
    """:func:`swap_wakv` over ``names`` whose k/v members are in ``kv_names`` (the QAT student)."""
    return swap_wakv(model, names, set(kv_names) & set(names), w_bits, a_bits, kv_bits, arith=arith,
                     ste_clip=ste_clip)


def swap_act_quant(model: nn.Module, names: Iterable[str], act_bits: int = 8, granularity: str = "per_token") -> list[str]:
    """SmoothQuant's A8: swap each named Linear for a :class:`QATLinear` whose input is fake-quantized to
    ``act_bits`` (``arith="smoothquant"``, dynamic, ``granularity`` scales) and whose weight is left as it
    is. Layers already swapped with that spec are skipped; returns the swapped names."""
    from quantlab.nn.swap import replace_module

    spec = QATSpec(a_bits=act_bits, arith="smoothquant", a_granularity=granularity)
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, QATLinear) and mod.spec == spec:
            continue
        if not _is_plain_hf_linear(mod):
            raise TypeError(f"{name} is a {type(mod).__name__}, not a plain nn.Linear")
        replace_module(model, name, QATLinear.from_linear(mod, spec))
        done.append(name)
    return done
