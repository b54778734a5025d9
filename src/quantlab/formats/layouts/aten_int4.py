"""torch's own CPU int4 weight-only kernel (``aten._weight_int4pack_mm_for_cpu``, torch >= 2.6).

``_convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, inner_k_tiles)`` returns a uint8 [N, K/2]
whose layout depends on the CPU (repack at load time, never save it).
``_weight_int4pack_mm_for_cpu(x [M, K], packed, G, scales_and_zeros [K/G, N, 2])`` computes
``x @ W^T`` with ``w = (q - 8) * scale + zero``; for an integer zero point z this is
``zero = (8 - z) * scale``. Constraints: G in {32, 64, 128, 256}, K % G == 0, N % 16 == 0, 2-D x.
With fp32 activations the op is 30-75x slower than with bf16 (reference/deployment-formats.md), so
:class:`~quantlab.nn.packed.PackedLinear` runs it on bf16 activations. Accuracy cost: besides the activations,
``scale`` and the zero term ``(8 - z) * scale`` are rounded to bf16; for an asymmetric grid that term's
rounding is the same for every weight of a group, so its error adds up coherently along the dot product
(measured on the tiny test model, whose input channels carry x20 outliers: max logit error 0.23 of the largest
logit for RTN w4 g32 asymmetric, 0.067 for GPTQ symmetric, reproduced exactly by the same rounding in plain
torch; ``scripts/export_roundtrip_errors.py``). On SmolLM2 the perplexity shift stays within noise
(``experiments/2026-12-deploy-smollm2``).
"""
from __future__ import annotations

import torch

from quantlab.formats.codes import QuantizedWeight

GROUP_SIZES = (32, 64, 128, 256)


def unsupported(qw: QuantizedWeight) -> str | None:
    """Why the kernel cannot run this weight, or None."""
    n, k = qw.shape
    if qw.bits != 4:
        return f"it multiplies 4-bit codes, not {qw.bits}-bit"
    if qw.group_size not in GROUP_SIZES:
        return f"group size {qw.group_size} is not one of {GROUP_SIZES}"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    return None


def pack(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed weight, scales_and_zeros)`` for contiguous groups (permute a g_idx weight first)."""
    why = unsupported(qw)
    if why or qw.g_idx is not None:
        raise ValueError(f"aten int4 CPU kernel: {why or 'permute act_order columns first'}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32).contiguous(), 1)
    s = qw.scales.to(torch.float32)
    sz = torch.stack([s.t(), ((8 - qw.zeros.to(torch.float32)) * s).t()], dim=-1)
    return packed, sz.to(dtype).contiguous()


def matmul(x2d: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, scales_and_zeros)
