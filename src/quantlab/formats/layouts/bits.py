"""Packing unsigned b-bit integers into int32 words, least significant field first."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned ``bits``-wide integers along ``dim`` into int32 words (``32 // bits`` per word).

    Field ``i`` of word ``j`` (bits ``i*b .. i*b+b-1``) holds element ``j * per_word + order[i]`` of ``dim``
    (``order`` defaults to ``0, 1, ...``; AWQ GEMM interleaves ``0, 2, 4, 6, 1, 3, 5, 7``).
    """
    if 32 % bits:
        raise ValueError(f"{bits}-bit values do not tile a 32-bit word")
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % per:
        raise ValueError(f"dimension {dim} has {v.shape[-1]} elements, not a multiple of {per}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values outside [0, {2**bits - 1}]")
    v = v.reshape(*v.shape[:-1], -1, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, device=v.device, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int64 values, ``dim`` grown ``32 // bits`` times."""
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * bits
    fields = (w[..., None] >> shifts) & (2**bits - 1)
    if order is not None:
        inv = [0] * per
        for i, o in enumerate(order):
            inv[o] = i
        fields = fields[..., inv]
    return fields.reshape(*w.shape[:-1], -1).movedim(-1, dim).contiguous()
