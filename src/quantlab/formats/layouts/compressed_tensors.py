"""compressed-tensors ``pack-quantized``: vLLM's native W4A16 layout (llm-compressor writes it).

Per quantized Linear ``<m>`` (W: N out, K in; G = group size; b = 4 or 8):

============================  ======  ==================  =================================================
tensor                        dtype   shape               content
============================  ======  ==================  =================================================
``<m>.weight_packed``         int32   [N, K*b/32]         code q stored as q_signed + 2^(b-1) = our unsigned
                                                          code; field i of word j = column (32/b) j + i, LSB
                                                          first
``<m>.weight_scale``          scale   [N, K/G]            ([N, 1] per channel)
``<m>.weight_shape``          int64   [2]                 [N, K]
``<m>.weight_zero_point``     int32   [ceil(N*b/32), K/G] asymmetric only: zero z (unsigned, = z_signed +
                                                          2^(b-1)) packed along the output rows
============================  ======  ==================  =================================================

``w = (q - z) * s`` (symmetric: z = 2^(b-1)). The packing itself is the library's
(``compressed_tensors ... pack_to_int32`` / ``unpack_from_int32``), so what quantlab writes is what
llm-compressor writes. ``weight_g_idx`` (act_order) is kept in memory only: compressed-tensors 0.20
removed it from its format, so :func:`check_exportable` refuses it.
"""
from __future__ import annotations

from typing import Any

import torch

from quantlab.formats.codes import QuantizedWeight

FORMAT = "pack-quantized"
BITS = (4, 8)


def _helpers():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def pack(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layout's tensors for one Linear (no module prefix); ``weight_g_idx`` only for permuted groups."""
    if qw.bits not in BITS:
        raise ValueError(f"compressed-tensors pack-quantized: quantlab packs {BITS}-bit codes, not {qw.bits}")
    pack_to_int32, _ = _helpers()
    off = 2 ** (qw.bits - 1)
    out = {
        "weight_packed": pack_to_int32((qw.codes.to(torch.int16) - off).to(torch.int8), qw.bits, packed_dim=1),
        "weight_scale": qw.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }
    if not qw.symmetric:
        zp = (qw.zeros.round().to(torch.int16) - off).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, qw.bits, packed_dim=0)
    if qw.g_idx is not None:
        out["weight_g_idx"] = qw.g_idx.clone()
    return out


def unpack(t: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool,
           scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from one Linear's layout tensors (scales cast to ``scale_dtype`` if given)."""
    _, unpack_from_int32 = _helpers()
    n, k = (int(v) for v in t["weight_shape"].tolist())
    off = 2 ** (bits - 1)
    codes = (unpack_from_int32(t["weight_packed"], bits, torch.Size((n, k)), packed_dim=1).to(torch.int16) + off)
    scales = t["weight_scale"] if scale_dtype is None else t["weight_scale"].to(scale_dtype)
    if symmetric:
        zeros = torch.full_like(scales, float(off))
    else:
        shape = torch.Size((n, scales.shape[1]))
        zp = unpack_from_int32(t["weight_zero_point"], bits, shape, packed_dim=0).to(torch.int16) + off
        zeros = zp.to(scales.dtype)
    g = group_size if group_size not in (None, -1) else k
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros, bits, g, symmetric, t.get("weight_g_idx"))


def quantization_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` (built with the library's own pydantic models, as
    ``ModelCompressor.update_config`` writes it)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    strategy = "channel" if group_size == -1 else "group"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if group_size == -1 else group_size, dynamic=False)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             format=FORMAT, quantization_status="compressed", ignore=list(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **cfg.model_dump(exclude={"quant_method"})}
