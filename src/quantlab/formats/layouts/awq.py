"""AWQ GEMM checkpoint layout (AutoAWQ ``version: gemm``; vLLM ``awq`` / ``awq_marlin``; transformers via gptqmodel).

Per Linear (W: N out, K in, G = group size, 4 bits):

* ``qweight`` int32 [K, N/8]: codes packed along N with AutoAWQ's interleave: nibble i of word c holds
  column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i];
* ``qzeros`` int32 [K/G, N/8]: the zeros themselves, same interleave;
* ``scales`` float16 [K/G, N].

Always asymmetric (``zero_point: true``), contiguous groups only (no g_idx), 4 bits.
"""
from __future__ import annotations

from typing import Any

import torch

from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.layouts.bits import pack_int32, unpack_int32

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros`` and ``scales`` (fp16) of one Linear."""
    if qw.bits != 4 or qw.g_idx is not None:
        raise ValueError("AWQ GEMM holds 4-bit codes in contiguous groups")
    return {
        "qweight": pack_int32(qw.codes.t(), 4, dim=1, order=ORDER),
        "qzeros": pack_int32(qw.zeros.round().to(torch.int64).t(), 4, dim=1, order=ORDER),
        "scales": qw.scales.t().to(torch.float16).contiguous(),
    }


def unpack(t: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    """A :class:`QuantizedWeight` (fp16 scales) from one Linear's AWQ GEMM tensors."""
    codes = unpack_int32(t["qweight"], 4, dim=1, order=ORDER).t()
    zeros = unpack_int32(t["qzeros"], 4, dim=1, order=ORDER).t()
    scales = t["scales"].t().contiguous()
    g = codes.shape[1] if group_size == -1 else group_size
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros.to(scales.dtype).contiguous(), 4, g, False)


def quantization_config(group_size: int) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
