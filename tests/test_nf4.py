"""Reference NF4 / FP4 (bitsandbytes' 4-bit codebooks) against bitsandbytes itself."""
from __future__ import annotations

import os

import pytest
import torch

from quantlab.formats.nf4 import (
    FP4_CODE,
    NF4_CODE,
    double_dequantize_absmax,
    double_quantize_absmax,
    dynamic_map,
    fake_quantize_codebook,
    quantize_codebook,
)

try:
    from bitsandbytes import functional as bnbF
except Exception:  # noqa: BLE001  (not installed, or no usable backend)
    bnbF = None
if bnbF is None and os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1":  # CI installs the bnb extra
    raise RuntimeError("bitsandbytes is required in CI (make test installs the bnb extra)")
needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes not installed (pip install quantlab[bnb])")


def test_nf4_codebook_is_the_normal_quantile_construction():
    """QLoRA: 8 positive and 7 negative N(0,1) quantiles (offset 0.9677083) plus an exact zero, scaled to [-1, 1]."""
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    vals = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    vals = vals / vals.abs().max()
    torch.testing.assert_close(vals.float(), torch.tensor(NF4_CODE), atol=1e-6, rtol=0)


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_codebooks_equal_bitsandbytes(kind):
    x = torch.zeros(1, 64)
    q, st = bnbF.quantize_4bit(x, blocksize=64, quant_type=kind)
    codes = torch.arange(16, dtype=torch.uint8)
    packed = torch.zeros_like(q)
    packed.view(-1)[:8] = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes packs the high nibble first
    st.absmax = torch.ones_like(st.absmax)
    got = bnbF.dequantize_4bit(packed, st).view(-1)[:16]
    assert torch.equal(got, torch.tensor(NF4_CODE if kind == "nf4" else FP4_CODE))


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_round_trip_is_bit_exact_with_bitsandbytes(kind):
    torch.manual_seed(0)
    w = torch.randn(256, 576) * 0.02
    w[3, :64] = 0.0  # an all-zero block
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind)
    codes, absmax = quantize_codebook(w, kind)
    assert torch.equal(absmax, st.absmax)
    assert torch.equal(fake_quantize_codebook(w, kind), bnbF.dequantize_4bit(q, st))


@needs_bnb
def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map().float())


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_double_quantization_matches_bitsandbytes_within_the_measured_tolerance(kind):
    """Same offset and second-level absmax; block-constant codes differ only where a constant lies
    within ~1e-5 of a midpoint of the 8-bit map (bitsandbytes then picks the other neighbour)."""
    torch.manual_seed(0)
    w = torch.randn(384, 576) * 0.02
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=True)
    codes, absmax = quantize_codebook(w, kind)
    c2, a2, offset = double_quantize_absmax(absmax)
    assert offset == pytest.approx(float(st.offset), abs=0) and torch.equal(a2, st.state2.absmax)
    assert (c2 == st.absmax).float().mean() >= 0.995  # measured 0.99740 (9 of 3456 constants differ)
    mine = fake_quantize_codebook(w, kind, double_quant=True)
    ref = bnbF.dequantize_4bit(q, st)
    assert (mine == ref).float().mean() >= 0.995  # measured 0.99766 (nf4), 0.99742 (fp4)
    assert (mine - ref).abs().max() <= 0.01 * w.abs().max()  # measured 0.00465 x max|w| (one 8-bit step)


def test_double_quantization_error_is_small_and_zero_blocks_stay_zero():
    torch.manual_seed(1)
    absmax = torch.rand(1000) * 0.1 + 0.01
    back = double_dequantize_absmax(*double_quantize_absmax(absmax))
    assert (back - absmax).abs().max() <= 0.01 * absmax.abs().max()  # 8-bit dynamic map; measured 0.0032
    w = torch.zeros(4, 64)
    assert torch.equal(fake_quantize_codebook(w, "nf4"), w)


def test_nf4_is_closer_than_fp4_on_gaussian_weights():
    """NF4 is information-theoretically optimal for normal weights (QLoRA section 3)."""
    torch.manual_seed(2)
    w = torch.randn(512, 512)
    err = {k: (fake_quantize_codebook(w, k) - w).pow(2).mean() for k in ("nf4", "fp4")}
    assert err["nf4"] < err["fp4"]
