"""Reference (fake-quant) NF4 and FP4: the bitsandbytes 4-bit data types, in plain torch.

Both are *codebook* formats (Dettmers et al., "QLoRA", arXiv 2305.14314, section 3): a weight
tensor is flattened and cut into blocks of ``blocksize`` (bitsandbytes default 64) consecutive
values; each block stores its absolute maximum ``absmax`` (fp32) and every value as the 4-bit index
of the nearest entry of a 16-value codebook ``c`` normalized to [-1, 1]:

    idx_i = argmin_j | w_i / absmax_b - c_j |,      w_hat_i = c[idx_i] * absmax_b      (QLoRA eq. 1-2)

* **NF4** ("NormalFloat"): the codebook places the quantiles of N(0, 1) so that each bin holds equal
  probability mass for normally distributed weights, with an exact zero (QLoRA section 3,
  "4-bit NormalFloat Quantization"; bitsandbytes ``create_normal_map(offset=0.9677083)``).
* **FP4**: bitsandbytes' 4-bit float (1 sign bit, 3 bits of exponent+mantissa), normalized so its
  largest magnitude is 1.

The codebook values below are bitsandbytes' (read back from ``dequantize_4bit`` of every code in
bitsandbytes 0.50.2; ``tests/test_nf4.py`` re-derives NF4 from the normal quantiles and compares
both codebooks and whole quantize/dequantize round trips with bitsandbytes itself).
"""
from __future__ import annotations

import torch

from quantlab.errors import ConfigError

#: NF4 codebook (QLoRA), index = 4-bit code
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: bitsandbytes FP4 codebook: codes 0-7 positive, 8-15 the same magnitudes negated (8 = -0)
_FP4_POS: tuple[float, ...] = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
FP4_CODE: tuple[float, ...] = _FP4_POS + tuple(-v for v in _FP4_POS)
CODEBOOKS: dict[str, tuple[float, ...]] = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def codebook(kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 codebook of ``kind`` (``nf4`` or ``fp4``)."""
    if kind not in CODEBOOKS:
        raise ConfigError("quantizer.format.kind", f"codebook formats are {sorted(CODEBOOKS)}, got {kind!r}")
    return torch.tensor(CODEBOOKS[kind], dtype=torch.float32, device=device)


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block absolute maximum of a 1-D tensor whose length is a multiple of ``blocksize``."""
    return flat.reshape(-1, blocksize).abs().amax(dim=1)


def nearest_level(blocks: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the level nearest to each ``blocks[i, j] / absmax[i]``, with
    bitsandbytes' exact arithmetic (``backends/default/ops.py``): multiply by the reciprocal of the
    absmax (floored at 1e-38), clamp to [-1, 1], bucketize on the fp32 midpoints of the sorted
    levels. A value exactly on a midpoint takes the LOWER level; that happens on real weights (253 of
    2.1M fp4 values in three SmolLM2 layers, whose dequantized-Q4_1 weights sit on few levels), and
    ``argmin |x - level|`` would pick differently."""
    x = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    levels, order = torch.sort(code)
    return order[torch.bucketize(x, (levels[:-1] + levels[1:]) / 2)].to(torch.uint8)


def quantize_codebook(w: torch.Tensor, kind: str, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and block absmax of ``w`` (QLoRA eq. 1: nearest codebook entry of ``w / absmax``).

    Args:
        w: any shape; ``w.numel()`` must be a multiple of ``blocksize``.
        kind: ``nf4`` or ``fp4``.
        blocksize: values per absmax block (bitsandbytes default 64).

    Returns:
        ``(codes, absmax)``: uint8 codes shaped like ``w`` (one per value, unpacked) and fp32
        ``absmax`` of shape ``(numel // blocksize,)``. An all-zero block gets absmax 0 and code of 0.0.
    """
    if w.numel() % blocksize:
        raise ConfigError("quantizer.blocksize", f"{w.numel()} values are not a multiple of blocksize {blocksize}")
    code = codebook(kind, w.device)
    flat = w.detach().reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)
    codes = nearest_level(flat.reshape(-1, blocksize), absmax, code)
    return codes.reshape(w.shape), absmax


def dequantize_codebook(codes: torch.Tensor, absmax: torch.Tensor, kind: str, blocksize: int = 64) -> torch.Tensor:
    """``w_hat = codebook[codes] * absmax`` (QLoRA eq. 2), fp32, shaped like ``codes``."""
    code = codebook(kind, codes.device)
    vals = code[codes.reshape(-1).long()].reshape(-1, blocksize) * absmax[:, None]
    return vals.reshape(codes.shape)


# ---------------------------------------------------------------------------------- double quantization
DQ_BLOCKSIZE = 256


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit "dynamic tree" codebook of bitsandbytes (Dettmers et al., "8-bit Optimizers
    via Block-wise Quantization", arXiv 2110.02861, section 2.3), sorted, 256 values in [-1, 1].

    For exponent ``i = 0..max_exponent_bits-1`` the decade ``10^(i - max_exponent_bits + 1)`` holds
    the midpoints of ``2^i + 1`` evenly spaced points in [0.1, 1] (both signs); 0 and 1 complete it.
    """
    non_sign = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, n)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (-(max_exponent_bits - 1) + i))
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def double_quantize_absmax(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor, float]:
    """QLoRA's double quantization (section 3, "Double Quantization") of the fp32 block constants:
    subtract their mean, then quantize blockwise (``blocksize`` 256) to the nearest entry of the
    8-bit dynamic map scaled by each block's absmax.

    Returns:
        ``(codes uint8, absmax2 fp32 per 256-block, offset)``; the last block may be partial.
    """
    code = dynamic_map().to(absmax.device)
    offset = float(absmax.float().mean())
    x = absmax.float() - offset
    n_blocks = -(-x.numel() // blocksize)
    padded = torch.zeros(n_blocks * blocksize, device=x.device)
    padded[: x.numel()] = x
    blocks = padded.reshape(n_blocks, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    codes = nearest_level(blocks, absmax2, code)[: x.numel()]
    return codes, absmax2, offset


def double_dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: float,
                             blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`double_quantize_absmax`: ``dynamic_map[codes] * absmax2 + offset``."""
    code = dynamic_map().to(codes.device)
    idx = torch.arange(codes.numel(), device=codes.device) // blocksize
    return code[codes.long()] * absmax2[idx] + offset


def fake_quantize_codebook(w: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """``w`` rounded to ``kind`` (nf4/fp4) and back, in ``w``'s dtype; with ``double_quant`` the block
    constants themselves go through :func:`double_quantize_absmax` first (bitsandbytes ``*-dq``)."""
    codes, absmax = quantize_codebook(w, kind, blocksize)
    if double_quant:
        absmax = double_dequantize_absmax(*double_quantize_absmax(absmax))
    return dequantize_codebook(codes, absmax, kind, blocksize).to(w.dtype)
