"""GPTQ v1 checkpoint layout (``checkpoint_format: gptq``; AutoGPTQ, GPTQModel, transformers + optimum, vLLM).

Per Linear (W: N out, K in, G = group size, b bits, ``per = 32 // b``):

* ``qweight`` int32 [K/per, N]: code q (unsigned) packed along K, field i of word r = row per*r + i, LSB first;
* ``qzeros`` int32 [K/G, N/per]: packed along N, storing **zero - 1** (the v1 convention; v2 stores the zero);
* ``scales`` float16 [K/G, N]; ``g_idx`` int32 [K] (the group of each input column; permuted under act_order).

``w[n, k] = scales[g_idx[k], n] * (q[k, n] - (stored_zero + 1))``. A symmetric checkpoint stores zero
2^(b-1) (so 2^(b-1) - 1 on disk), which is what vLLM serves; it refuses asymmetric GPTQ.
"""
from __future__ import annotations

from typing import Any

import torch

from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.layouts.bits import pack_int32, unpack_int32

BITS = (4, 8)


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` (fp16) and ``g_idx`` of one Linear."""
    if qw.bits not in BITS:
        raise ValueError(f"GPTQ v1: quantlab packs {BITS}-bit codes, not {qw.bits}")
    zeros = qw.zeros.round().to(torch.int64) - 1  # v1 stores zero - 1 (a zero of 0 wraps to all ones)
    zeros = zeros & (2**qw.bits - 1)
    return {
        "qweight": pack_int32(qw.codes.t(), qw.bits, dim=0),
        "qzeros": pack_int32(zeros.t(), qw.bits, dim=1),
        "scales": qw.scales.t().to(torch.float16).contiguous(),
        "g_idx": qw.group_index().to(torch.int32).clone(),
    }


def unpack(t: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """A :class:`QuantizedWeight` (fp16 scales) from one Linear's GPTQ v1 tensors."""
    codes = unpack_int32(t["qweight"], bits, dim=0).t()
    zeros = (unpack_int32(t["qzeros"], bits, dim=1).t() + 1) & (2**bits - 1)
    scales = t["scales"].t().contiguous()
    k = codes.shape[1]
    g = k if group_size == -1 else group_size
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros.to(scales.dtype).contiguous(), bits,
                           g, symmetric, t.get("g_idx"))


def quantization_config(bits: int, group_size: int, symmetric: bool, desc_act: bool) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": symmetric, "checkpoint_format": "gptq", "true_sequential": True}
