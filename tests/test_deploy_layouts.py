"""Packed layouts and PackedLinear against independent unpackers written here (no quantlab unpacking code)."""
from __future__ import annotations

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.codes import QuantizedWeight, from_format
from quantlab.formats.layouts import awq, gptq
from quantlab.formats.layouts import compressed_tensors as ct
from quantlab.formats.layouts.bits import pack_int32
from quantlab.formats.spec import QuantFormat
from quantlab.nn.packed import PackedLinear


def _qw(n=48, k=128, bits=4, g=32, sym=False, g_idx=None, seed=0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen).to(torch.uint8)
    scales = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    zeros = torch.full_like(scales, 2 ** (bits - 1)) if sym else torch.randint(0, maxq + 1, scales.shape, generator=gen).float()
    return QuantizedWeight(codes, scales, zeros, bits, g, sym, g_idx)


def _fields(word: int, bits: int) -> list[int]:
    """The 32 // bits unsigned fields of one int32 word, least significant first (plain Python ints)."""
    w = word & 0xFFFFFFFF
    return [(w >> (bits * i)) & (2**bits - 1) for i in range(32 // bits)]


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (8, True)])
def test_compressed_tensors_layout(bits, sym):
    qw = _qw(bits=bits, sym=sym)
    t = ct.pack(qw, torch.float32)
    per = 32 // bits
    assert t["weight_packed"].shape == (48, 128 // per) and t["weight_packed"].dtype == torch.int32
    assert t["weight_shape"].tolist() == [48, 128]
    row = [f for w in t["weight_packed"][5].tolist() for f in _fields(w, bits)]
    assert row == qw.codes[5].tolist()  # signed + 2^(b-1) == our unsigned code, column 8j+i in nibble i
    if sym:
        assert "weight_zero_point" not in t
    else:
        zp = t["weight_zero_point"]  # packed along the output rows
        assert zp.shape == (48 // per, 4)
        col = [f for w in zp[:, 2].tolist() for f in _fields(w, bits)]
        assert col == qw.zeros[:, 2].long().tolist()
    back = ct.unpack(t, bits, 32, sym)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros) and torch.equal(back.scales, qw.scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_own_packer_equals_the_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = _qw(bits=bits).codes
    ours = pack_int32(codes, bits, dim=1)
    theirs = pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=1)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_gptq_v1_layout(bits, act_order):
    g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(3)) // 32 if act_order else None
    qw = _qw(bits=bits, sym=True, g_idx=g_idx)
    t = gptq.pack(qw)
    per = 32 // bits
    assert t["qweight"].shape == (128 // per, 48) and t["qzeros"].shape == (4, 48 // per)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (4, 48)
    col = [f for w in t["qweight"][:, 7].tolist() for f in _fields(w, bits)]  # packed along K
    assert col == qw.codes[7].tolist()
    stored = [f for w in t["qzeros"][1].tolist() for f in _fields(w, bits)]  # v1: zero - 1
    assert stored == (qw.zeros[:, 1].long() - 1).tolist()
    assert torch.equal(t["g_idx"], qw.group_index())
    # independent dequantization: w[n, k] = scales[g_idx[k], n] * (q[k, n] - (stored + 1))
    q = torch.tensor([[f for w in t["qweight"][:, n].tolist() for f in _fields(w, bits)] for n in range(48)]).t()
    z = torch.tensor([[f for w in t["qzeros"][g].tolist() for f in _fields(w, bits)] for g in range(4)]) + 1
    gi = t["g_idx"].long()
    w = t["scales"].float()[gi, :] * (q.float() - z.float()[gi, :])
    ref = (qw.codes.float() - qw.zeros[:, qw.group_index().long()]) * qw.scales.half().float()[:, qw.group_index().long()]
    assert torch.equal(w.t(), ref)
    back = gptq.unpack(t, bits, 32, True)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros.float(), qw.zeros)


def test_awq_gemm_layout_interleave():
    qw = _qw(sym=False)
    t = awq.pack(qw)
    assert t["qweight"].shape == (128, 6) and t["qzeros"].shape == (4, 6)
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of word c = column 8c + order[i]
    for k in (0, 77):
        fields = [f for w in t["qweight"][k].tolist() for f in _fields(w, 4)]
        got = [0] * 48
        for c in range(6):
            for i in range(8):
                got[8 * c + order[i]] = fields[8 * c + i]
        assert got == qw.codes[:, k].tolist()
    back = awq.unpack(t, 32)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros.float(), qw.zeros)


def test_reference_backend_equals_fake_quant_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    for sym in (False, True):
        fmt = QuantFormat(bits=4, group_size=32, symmetric=sym, zero_in_range=False, symmetric_grid="full")
        q, s, z = affine.quantize_weight(lin.weight.data, fmt)
        x = torch.randn(3, 5, 128)
        want = torch.nn.functional.linear(x, affine.dequantize(q, s, z, fmt), lin.bias)
        got = PackedLinear(from_format(q, s, z, fmt), lin.bias, torch.float32, "reference")(x)
        assert torch.equal(got, want)


@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_backend_matches_reference(act_order):
    g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(3)) // 32 if act_order else None
    qw = _qw(g_idx=g_idx)
    x = torch.randn(7, 128)
    ref = PackedLinear(qw, None, torch.float32, "reference")(x)
    mod = PackedLinear(qw, None, torch.float32, "cpu")
    got = mod(x)
    assert got.dtype == torch.float32
    # bf16 activations and scales: measured max rel. error 3.1e-3 (this seed), 4e-3 in the reference doc
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-2
    assert ("ws_perm" in dict(mod.named_buffers())) == act_order
    assert not any(k.startswith("ws_") for k in mod.state_dict())  # the CPU repack is never saved


def test_backend_refusals_name_the_setting():
    with pytest.raises(ConfigError, match="deploy.backend.*group size 16"):
        PackedLinear(_qw(g=16), None, torch.float32, "cpu")
    with pytest.raises(ConfigError, match="deploy.backend.*multiple of 16"):
        PackedLinear(_qw(n=40), None, torch.float32, "cpu")
    with pytest.raises(ConfigError, match="deploy.backend"):
        PackedLinear(_qw(), None, torch.float32, "cuda-magic")
