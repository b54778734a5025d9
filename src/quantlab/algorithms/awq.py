"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization"): the math of its two searches.

Pure functions on tensors; the per-block schedule lives in :mod:`quantlab.quantizers.awq`.

**Scale search** (paper section 3.2). For Linears ``W`` that share an input ``X`` and a module ``f``
whose output is compared (the whole attention, the whole MLP, or the Linear itself), AWQ looks for
per-input-channel scales ``s`` minimising::

    L(s) = || f(X; Q(W diag(s)) diag(s)^-1) - f(X; W) ||^2                     (eq. 4)

    s = s_X^alpha,   alpha* = argmin_alpha L(s_X^alpha)                         (eq. 5)

with ``s_X`` the per-channel mean of ``|x|`` over the calibration tokens and ``alpha`` on the
grid ``0, 1/n, ..., (n-1)/n`` (n_grid = 20; ``llm-awq auto_scale.py``). The candidates are
normalised by ``sqrt(max(s) min(s))``. AutoAWQ's "duo scaling" divides by a weight term:
``s = s_X^alpha / (w_mean^(1-alpha) + 1e-4)`` with ``w_mean`` the mean over rows of
``|W| / group absmax``.

**Clip search** (``llm-awq auto_clip.py``). For each group of each output row, a symmetric clamp
``[-m, m]`` with ``m = absmax (1 - i / n_grid)``, ``i < max_shrink * n_grid`` (10 candidates down to
0.55 absmax), chosen to minimise the mean over tokens of ``(sum_group x Q(clamp(w)) - sum_group x w)^2``
on 512 tokens taken with a fixed stride. ``i = 0`` is "no clipping", so the chosen clamp never
increases this error.

Both errors are quadratic forms in the weight error ``D = W_q - W``: ``sum_t (x_t . d)^2 = d^T (X^T X) d``.
Where a Gram matrix is cheaper than the tokens (clip search with groups smaller than the token
sample; a Linear inspected on its own), it is used instead of the per-token outputs: the same
number, computed without materialising the outputs. All math runs in float32 (float64 stays).
"""
from __future__ import annotations

import torch

from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat

SCALE_FLOOR = 1e-4  # llm-awq / AutoAWQ: clamp(min=1e-4) on the candidate scales
DUO_EPS = 1e-4  # AutoAWQ: w_mean^(1-r) + 1e-4
GROUP_EPS = 1e-6  # AutoAWQ: |W| / (group absmax + 1e-6)
CLIP_BATCH_ELEMS = 1 << 21  # clip search: candidates x rows x in_features per output-channel batch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def grid_ratios(n_grid: int) -> list[float]:
    """Eq. 5 grid ``[i / n_grid for i in range(n_grid)]`` (alpha = 1.0 is never tried, as in llm-awq)."""
    return [i / n_grid for i in range(n_grid)]


def weight_mean(weights: list[torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """AutoAWQ's duo-scaling weight term: mean over the rows of all ``weights`` of ``|W| / group absmax``, (in,)."""
    dt = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    w = torch.cat([x.detach().to(dt) for x in weights], dim=0).abs()
    wg = affine.group_view(w, fmt)
    return (wg / (wg.amax(dim=-1, keepdim=True) + GROUP_EPS)).reshape(w.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 candidate for ``alpha = ratio``, normalised by ``sqrt(max(s) min(s))``; inf/NaN entries -> 1.

    Args:
        x_mean: ``s_X``, the per-channel mean |x| of the group's input, (in,).
        ratio: alpha in [0, 1).
        w_mean: AutoAWQ duo scaling's weight term (:func:`weight_mean`), or None (paper / llm-awq).

    Returns:
        ``s`` (in,) in float32 (float64 for float64 statistics). ``ratio = 0`` without duo scaling
        gives all ones (the identity).
    """
    dt = compute_dtype(x_mean)
    x = x_mean.to(dt)
    if w_mean is None:
        s = x.pow(ratio).clamp(min=SCALE_FLOOR)
    else:
        s = (x.pow(ratio) / (w_mean.to(device=x.device, dtype=dt).pow(1.0 - ratio) + DUO_EPS)).clamp(min=SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` (eq. 4's quantized weight for candidate ``s``), in W's dtype."""
    sv = s.to(device=w.device, dtype=torch.promote_types(w.dtype, compute_dtype(s)))
    return (affine.fake_quantize(w.to(sv.dtype) * sv, fmt) / sv).to(w.dtype)


def quadratic_loss(w_q: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, n_tokens: int) -> float:
    """Eq. 4 for a Linear inspected on its own: ``mean((X W_q^T - X W^T)^2)`` from ``gram = X^T X``.

    ``sum_t sum_r (x_t . d_r)^2 = sum_r d_r^T (X^T X) d_r`` with ``D = W_q - W`` (out, in); divided by
    ``n_tokens * out`` it is the mean over all output elements (a bias cancels in the difference).
    """
    dt = gram.dtype
    d = w_q.to(dt) - w.to(dt)
    return float(torch.einsum("ri,ri->", d @ gram, d)) / (n_tokens * w.shape[0])


def sample_stride(n_tokens: int, n_sample: int) -> int:
    """llm-awq ``auto_clip_layer``: tokens ``0::step`` with ``step = n_tokens // n_sample`` (at least 1)."""
    return max(1, n_tokens // n_sample)


def clip_candidates(n_grid: int, max_shrink: float) -> list[float]:
    """Shrink factors ``1 - i / n_grid`` for ``i < max_shrink * n_grid`` (the first is 1: no clipping)."""
    return [1.0 - i / n_grid for i in range(int(max_shrink * n_grid))]


def _group_metric(x: torch.Tensor, g: int, dt: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Per-group error metric of sample inputs ``x`` (T, in): Gram ``X_j^T X_j / T`` (G, g, g) when g <= T,
    else the scaled inputs ``X_j^T / sqrt(T)`` (G, g, T). Returns ``(metric, is_gram)``."""
    t = x.shape[0]
    xg = x.to(dt).reshape(t, -1, g).permute(1, 2, 0)  # (G, g, T)
    if g <= t:
        return torch.bmm(xg, xg.transpose(1, 2)) / t, True
    return xg / t**0.5, False


def _group_errors(d: torch.Tensor, metric: torch.Tensor, is_gram: bool) -> torch.Tensor:
    """``mean_t (x_t . d)^2`` per row and group for weight errors ``d`` (R, G, g); returns (R, G)."""
    dg = d.permute(1, 0, 2)  # (G, R, g)
    prod = torch.bmm(dg, metric)
    err = (prod * dg).sum(-1) if is_gram else prod.pow(2).sum(-1)
    return err.T


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, fmt: QuantFormat, n_grid: int = 20, max_shrink: float = 0.5,
                max_elems: int = CLIP_BATCH_ELEMS) -> torch.Tensor:
    """Best clamp value per (row, group) for W (out, in) given sampled inputs ``x`` (tokens, in).

    Every candidate of a batch of output channels is evaluated at once (one fake quantization of a
    (candidates * rows, in) matrix); the batch is sized so that it holds at most ``max_elems`` values.
    Ties keep the larger clamp (the reference's strict ``err < best``).

    Returns:
        ``max_val`` (out, n_groups) in the compute dtype: clamp each group to ``[-max_val, max_val]``.
    """
    dt = torch.promote_types(compute_dtype(w), compute_dtype(x))
    out_f, in_f = w.shape
    g = fmt.effective_group_size(in_f)
    metric, is_gram = _group_metric(x, g, dt)
    shrink = torch.tensor(clip_candidates(n_grid, max_shrink), dtype=dt, device=w.device)
    n_c = shrink.numel()
    rows = max(1, max_elems // (n_c * in_f))
    best = []
    for r0 in range(0, out_f, rows):
        wg = w[r0:r0 + rows].to(dt).reshape(-1, in_f // g, g)  # (R, G, g)
        absmax = wg.abs().amax(dim=-1)  # (R, G)
        m = absmax[None] * shrink[:, None, None]  # (C, R, G)
        cw = torch.minimum(torch.maximum(wg[None], -m[..., None]), m[..., None])  # (C, R, G, g)
        qw = affine.fake_quantize(cw.reshape(-1, in_f), fmt).reshape(cw.shape)
        err = _group_errors((qw - wg[None]).reshape(-1, in_f // g, g), metric, is_gram).reshape(m.shape)
        err = torch.nan_to_num(err, nan=float("inf"))
        idx = err.argmin(dim=0)  # first minimum: the largest clamp among ties
        best.append(m.gather(0, idx[None])[0])
    return torch.cat(best, dim=0)


def clip_error(w: torch.Tensor, x: torch.Tensor, fmt: QuantFormat, max_val: torch.Tensor | None = None) -> torch.Tensor:
    """The clip search's objective, computed directly: sum over rows and groups of
    ``mean_t (sum_group x Q(clamp(w)) - sum_group x w)^2`` (no clamp when ``max_val`` is None)."""
    dt = torch.promote_types(compute_dtype(w), compute_dtype(x))
    wc = w.to(dt) if max_val is None else apply_clip(w.to(dt), max_val, fmt)
    g = fmt.effective_group_size(w.shape[1])
    d = (affine.fake_quantize(wc, fmt) - w.to(dt)).reshape(w.shape[0], -1, g)  # (out, G, g)
    xg = x.to(dt).reshape(x.shape[0], -1, g)  # (T, G, g)
    return torch.einsum("tjk,rjk->trj", xg, d).pow(2).mean(dim=0).sum()


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Clamp each group of W (out, in) to ``[-max_val, max_val]`` (max_val: (out, n_groups)); W's dtype."""
    wg = affine.group_view(w, fmt)
    m = max_val.to(device=w.device, dtype=w.dtype)[..., None]
    return torch.minimum(torch.maximum(wg, -m), m).reshape(w.shape)
