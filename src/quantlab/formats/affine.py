"""Reference uniform (affine) quantization on integer grids: pure functions on tensors.

Notation (as in the GPTQ/AWQ papers and code): W is (out, in); a group is ``g`` consecutive input
channels of one output row; b = bits; maxq = 2^b - 1. For each group,

    q = clamp(round(w / s) + z, 0, maxq)          (quantize)
    w_hat = (q - z) * s                            (dequantize)

with ``round`` = round-half-to-even (``torch.round``), as in every PyTorch reference quantizer.

Parameter choice (``choose_qparams``):
  * asymmetric, ``zero_in_range=False`` (AWQ / SmoothQuant+ / llm-awq ``pseudo_quantize_tensor``):
    s = max(max(w) - min(w), 1e-5) / maxq,  z = clamp(-round(min(w) / s), 0, maxq)
  * asymmetric, ``zero_in_range=True`` (GPTQ ``Quantizer.find_params``): range widened to contain 0,
    an all-zero group gets [-1, 1]; s = (xmax - xmin) / maxq, z = round(-xmin / s)
  * symmetric, ``symmetric_grid="restricted"`` (LLM-QAT Eq. 3; no clipping): s = max|w| / (2^(b-1) - 1),
    z = 2^(b-1), codes 1..2^b - 1 (the all-zero group gets s = 1).
  * symmetric, ``symmetric_grid="full"`` (GPTQ ``Quantizer.find_params`` with ``sym=True``, line for line):
    xmin = min(min(w), 0), xmax = max(max(w), 0); xmax = max(|xmin|, xmax); where xmin < 0, xmin = -xmax;
    an all-zero group gets [-1, 1]; s = (xmax - xmin) / maxq, z = (maxq + 1) / 2. So s = 2 max|w| / maxq
    with all 2^b codes, except in a group with no negative weight, where GPTQ keeps xmin = 0 and
    s = max(w) / maxq with z = 2^(b-1): its top half clips at 7/15 of max(w) (b = 4). Reproduced as is.
  Groups whose scale underflows to 0 (subnormal weights) are treated like all-zero groups.

All math runs in float32 (float64 inputs stay float64) and results are cast back by callers.
"""
from __future__ import annotations

import torch

from quantlab.formats.spec import QuantFormat

AWQ_MIN_RANGE = 1e-5  # llm-awq: (max - min).clamp(min=1e-5)


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def group_view(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Reshape W (out, in) to (out, in // g, g); ``g`` must divide ``in``."""
    out_f, in_f = w.shape
    g = fmt.effective_group_size(in_f)
    if in_f % g:
        raise ValueError(f"group_size {g} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // g, g)


def choose_qparams(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group.

    Args:
        w: weight (out, in).
        fmt: the format.

    Returns:
        ``(scale, zero)``, each (out, in // g) in the compute dtype; ``zero`` holds integers.
    """
    wg = group_view(w.to(_compute_dtype(w)), fmt)
    maxq = fmt.maxq
    if fmt.symmetric and fmt.symmetric_grid == "full":
        xmin = wg.amin(dim=-1).clamp(max=0)
        xmax = torch.maximum(wg.amax(dim=-1).clamp(min=0), xmin.abs())
        xmin = torch.where(xmin < 0, -xmax, xmin)
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 / maxq))  # subnormal: as all-zero
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    if fmt.symmetric:
        qpos = 2 ** (fmt.bits - 1) - 1
        scale = wg.abs().amax(dim=-1) / qpos
        # all-zero groups (and subnormal ones whose scale underflows to 0) get s = 1: codes z, values 0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(2 ** (fmt.bits - 1)))
        return scale, zero
    wmin = wg.amin(dim=-1)
    wmax = wg.amax(dim=-1)
    if fmt.zero_in_range:
        wmin = wmin.clamp(max=0)
        wmax = wmax.clamp(min=0)
        both_zero = (wmin == 0) & (wmax == 0)
        wmin = torch.where(both_zero, -torch.ones_like(wmin), wmin)
        wmax = torch.where(both_zero, torch.ones_like(wmax), wmax)
        scale = (wmax - wmin) / maxq
        # a range so small that s underflows to 0 (subnormal weights) is treated like an all-zero group
        tiny = scale == 0
        wmin = torch.where(tiny, -torch.ones_like(wmin), wmin)
        scale = torch.where(tiny, torch.full_like(scale, 2.0 / maxq), scale)
        zero = torch.round(-wmin / scale)
    else:
        scale = (wmax - wmin).clamp(min=AWQ_MIN_RANGE) / maxq
        zero = torch.clamp(-torch.round(wmin / scale), 0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes q = clamp(round(w / s) + z, 0, maxq) as uint8, shape (out, in)."""
    wg = group_view(w.to(scale.dtype), fmt)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, fmt.maxq)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """w_hat = (q - z) * s, shape (out, in), in ``scale``'s dtype."""
    qg = group_view(q.to(scale.dtype), fmt)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(q.shape)


def quantize_weight(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(codes, scale, zero)`` for W (out, in) with min/max parameters."""
    scale, zero = choose_qparams(w, fmt)
    return quantize(w, scale, zero, fmt), scale, zero


def _minmax_rtn_(wg: torch.Tensor, maxq: int) -> torch.Tensor:
    """Asymmetric min/max RTN of ``wg`` (out, n_groups, g) in place: :func:`choose_qparams`' float operations,
    then ``clamp(round(w/s) + z, 0, maxq) - z`` as ``clamp(round(w/s), -z, maxq - z)`` (small integers, exact)."""
    wmin, wmax = torch.aminmax(wg, dim=-1)
    scale = (wmax - wmin).clamp_(min=AWQ_MIN_RANGE).div_(maxq)
    zero = torch.round(wmin / scale).neg_().clamp_(0, maxq)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return wg.div_(s).round_().clamp_(min=z.neg(), max=maxq - z).mul_(s)


def _minmax_format(fmt: QuantFormat) -> bool:
    return not fmt.symmetric and not fmt.zero_in_range and not fmt.is_codebook


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of W (out, in); returns W's dtype and device.

    ``dequantize(*quantize_weight(w, fmt))``, value for value. For the asymmetric min/max format (AWQ,
    SmoothQuant+, RTN's default) the same scales and zero points come from the same float operations
    and the codes, integers either way, are clamped as ``q - z`` in place without the uint8 round trip
    (4 passes over W instead of 8; ``torch.equal`` to the codes path, a code 0 may come out as -0.0).
    """
    if not _minmax_format(fmt):
        q, scale, zero = quantize_weight(w, fmt)
        return dequantize(q, scale, zero, fmt).to(w.dtype)
    wg = group_view(w.to(_compute_dtype(w), copy=True), fmt)
    return _minmax_rtn_(wg, fmt.maxq).reshape(w.shape).to(w.dtype)


def fake_quantize_(w: torch.Tensor, fmt: QuantFormat) -> None:
    """``w.copy_(fake_quantize(w, fmt))`` without temporaries of W's size where possible (float32/64)."""
    if _minmax_format(fmt) and w.dtype in (torch.float32, torch.float64) and w.is_contiguous():
        _minmax_rtn_(group_view(w, fmt), fmt.maxq)
    else:
        w.copy_(fake_quantize(w, fmt))
