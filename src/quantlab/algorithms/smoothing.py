"""Per-channel smoothing (SmoothQuant, SmoothQuant+, AWQ scales): pure math plus the exact fold.

SmoothQuant+ (Pan et al. 2023) eq. (5): for a Linear ``Y = X W^T``, dividing the input channels by
``s`` and multiplying the matching weight columns by ``s`` leaves the output unchanged::

    Y = (X diag(s)^-1) (W diag(s))^T                                    (eq. 5)

The division is folded into whatever produces ``X`` (an RMSNorm's gain, or the output rows of the
previous Linear), so the full-precision model computes the same function. Eq. (6) chooses::

    s_j = max(|X_j|)^alpha / max(|W_j|)^(1 - alpha)                      (eq. 6)

with ``max|W_j|`` taken over the concatenated rows of every Linear that reads input ``j`` (the
upstream SmoothQuant ``smooth_ln_fcs`` convention; the paper does not say).
"""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

from quantlab.models.mappings import ScaleGroup
from quantlab.utils.torch_utils import get_linear

SCALE_FLOOR = 1e-5  # SmoothQuant smooth.py: clamp(min=1e-5) on weight maxima and on s


def weight_absmax_per_input(weights: list[torch.Tensor]) -> torch.Tensor:
    """``max_i |W[i, j]|`` over the rows of all ``weights`` (each (out_k, in)), shape (in,), float32+."""
    dt = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    return torch.cat([w.detach().to(dt).abs() for w in weights], dim=0).amax(dim=0)


def smoothquant_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (6): ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.

    Args:
        act_absmax: per-input-channel max |x| over the calibration set, shape (in,).
        w_absmax: per-input-channel max |w| over the consuming Linears, shape (in,).
        alpha: smoothing strength in [0, 1] (0: s depends on weights only; 1: on activations only).

    Returns:
        ``s`` (in,), in the dtype of ``act_absmax`` promoted to at least float32, floored at 1e-5
        like the reference (weights' maxima are floored too; a channel never seen active gets the
        floor as its activation maximum, i.e. a small scale).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dt = torch.promote_types(act_absmax.dtype, torch.float32)
    a = act_absmax.to(dt).clamp(min=SCALE_FLOOR)
    w = w_absmax.to(dt).clamp(min=SCALE_FLOOR)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=SCALE_FLOOR)


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Apply eq. (5) in place: inputs of ``group.linears`` divided by ``s``, their weight columns times ``s``.

    The division goes into ``group.prev``: an RMSNorm/LayerNorm (gain and bias divided by ``s``) or
    a Linear (output rows and bias divided by ``s``). Math runs in float32 (float64 stays float64)
    and is cast back to each parameter's dtype.
    """
    prev = block.get_submodule(group.prev)
    if group.prev_kind == "norm":
        _scale_(cast(torch.Tensor, prev.weight), s, dim=0, divide=True)
        if getattr(prev, "bias", None) is not None:
            _scale_(cast(torch.Tensor, prev.bias), s, dim=0, divide=True)
    elif group.prev_kind == "linear":
        _scale_(cast(torch.Tensor, prev.weight), s, dim=0, divide=True)  # output rows
        if prev.bias is not None:
            _scale_(cast(torch.Tensor, prev.bias), s, dim=0, divide=True)
    else:
        raise ValueError(f"unknown prev_kind {group.prev_kind!r} in {group}")
    for name in group.linears:
        _scale_(get_linear(block, name).weight, s, dim=1, divide=False)  # input columns


def _scale_(p: torch.Tensor, s: torch.Tensor, dim: int, divide: bool) -> None:
    dt = torch.promote_types(p.dtype, torch.float32)
    v = s.to(device=p.device, dtype=dt)
    shape = [1] * p.dim()
    shape[dim] = -1
    v = v.reshape(shape)
    x = p.data.to(dt)
    p.data.copy_((x / v if divide else x * v).to(p.dtype))


def group_scales(block: nn.Module, groups: list[ScaleGroup], act_absmax: dict[str, torch.Tensor],
                 alpha: float) -> dict[str, torch.Tensor]:
    """Eq. (6) scales of every group of one block, all computed from the block's *current* weights.

    Computing every ``s`` before folding any of them keeps the groups independent (folding
    up_proj -> down_proj rescales up_proj's rows, which would otherwise change the weight maxima of
    the post_attention_layernorm -> [gate, up] group).

    Args:
        act_absmax: ``group.key -> max|x|`` (in,) of the group's input in the full-precision model.
    """
    out = {}
    for g in groups:
        w_max = weight_absmax_per_input([get_linear(block, n).weight for n in g.linears])
        out[g.key] = smoothquant_scales(act_absmax[g.key].to(w_max.device), w_max, alpha)
    return out


def fold_group_scales(block: nn.Module, groups: list[ScaleGroup], scales: dict[str, torch.Tensor]) -> None:
    """:func:`fold_scales` for every group of one block."""
    for g in groups:
        fold_scales(block, g, scales[g.key])
