"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"): pure math of the two searches.

Scale search (paper section 3.2, eq. 4-5): for a group of Linears sharing input X, find per-input-
channel scales ``s`` minimising ``|| f(X; Q(W diag(s)) diag(s)^-1) - f(X; W) ||^2`` with
``s = s_X^alpha`` (s_X = mean |x| per channel), alpha on a grid (n_grid = 20: 0, 0.05, ..., 0.95;
``llm-awq auto_scale.py``), normalised by ``sqrt(max(s) min(s))``. AutoAWQ's "duo scaling" divides
by ``w_mean^(1-alpha)`` (w_mean = mean over rows of |W| / group absmax).

Clip search (``llm-awq auto_clip.py``): per group of each output row, a symmetric clamp
``[-m, m]`` with ``m = absmax (1 - i / n_grid)`` for i < max_shrink * n_grid, chosen to minimise the
mean over tokens of ``(sum_group x Q(clamp(w)) - sum_group x w)^2``.
"""
from __future__ import annotations

import torch

from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat

SCALE_FLOOR = 1e-4  # llm-awq: x_max.pow(ratio).clamp(min=1e-4)


def grid_ratios(n_grid: int) -> list[float]:
    """The reference grid ``[i / n_grid for i in range(n_grid)]`` (1.0 is never tried)."""
    return [i / n_grid for i in range(n_grid)]


def weight_mean(weights: list[torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """AutoAWQ's duo-scaling weight term: mean over rows of ``|W| / group absmax`` (in,)."""
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    g = fmt.effective_group_size(w.shape[1])
    wg = w.abs().reshape(w.shape[0], -1, g)
    return (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 candidate ``s = s_X^ratio`` (or duo ``s_X^r / (w_mean^(1-r) + 1e-4)``), normalised; inf/NaN -> 1."""
    x = x_mean.float()
    if w_mean is None:
        s = x.pow(ratio).clamp(min=SCALE_FLOOR)
    else:
        s = (x.pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` in W's dtype (the weight AWQ evaluates for candidate ``s``)."""
    sv = s.to(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))
    return (affine.fake_quantize(w.to(sv.dtype) * sv, fmt) / sv).to(w.dtype)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, fmt: QuantFormat, n_grid: int = 20, max_shrink: float = 0.5,
                batch_rows: int = 256) -> torch.Tensor:
    """Best clamp value per (row, group) for weight W (out, in) given sample inputs ``x`` (tokens, in).

    Returns:
        ``max_val`` (out, n_groups): clamp W's groups to ``[-max_val, max_val]`` before quantizing.
    """
    dt = torch.promote_types(w.dtype, torch.float32)
    out_f, in_f = w.shape
    g = fmt.effective_group_size(in_f)
    n_g = in_f // g
    xg = x.to(dt).reshape(-1, n_g, g).permute(1, 0, 2)  # (G, T, g)
    best_all = []
    for r0 in range(0, out_f, batch_rows):
        wb = w[r0:r0 + batch_rows].to(dt)  # (ob, in)
        wg = wb.reshape(-1, n_g, g)  # (ob, G, g)
        ref = torch.bmm(xg, wg.permute(1, 2, 0))  # (G, T, ob)
        org_max = wg.abs().amax(dim=-1)  # (ob, G)
        best = org_max.clone()
        best_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            m = org_max * (1 - i / n_grid)
            cw = torch.maximum(torch.minimum(wg, m[..., None]), -m[..., None]).reshape(wb.shape)
            qw = affine.fake_quantize(cw, fmt).reshape(-1, n_g, g)
            err = (torch.bmm(xg, qw.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).T  # (ob, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        best_all.append(best)
    return torch.cat(best_all, dim=0)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Clamp each group of W (out, in) to ``[-max_val, max_val]`` (out, n_groups); returns W's dtype."""
    g = fmt.effective_group_size(w.shape[1])
    wg = w.reshape(w.shape[0], -1, g)
    m = max_val.to(device=w.device, dtype=w.dtype)[..., None]
    return torch.maximum(torch.minimum(wg, m), -m).reshape(w.shape)
