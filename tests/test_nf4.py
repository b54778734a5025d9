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
def test_values_exactly_on_a_midpoint_round_like_bitsandbytes(kind):
    """Ties are real: SmolLM2's dequantized-Q4_1 weights put 253 of 2.1M values exactly on fp4
    midpoints. bitsandbytes gives a tie the LOWER level; argmin |x - level| did not (fixed)."""
    code = torch.tensor(NF4_CODE if kind == "nf4" else FP4_CODE)
    levels = torch.sort(code).values
    mids = (levels[:-1] + levels[1:]) / 2
    w = torch.cat([mids, -mids, torch.tensor([1.0])])  # one block: absmax 1, every midpoint, both signs
    w = torch.cat([w, torch.zeros(64 - w.numel())])[None, :]
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type=kind)
    assert torch.equal(fake_quantize_codebook(w, kind), bnbF.dequantize_4bit(q, st))


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


# --- the format and the nf4_ref / fp4_ref quantizers -----------------------------------------------
def test_codebook_format_accounting_and_validation():
    from quantlab.errors import ConfigError
    from quantlab.formats.spec import QuantFormat

    f = QuantFormat(bits=4, group_size=64, kind="nf4", scale_bits=32)
    assert f.short_name() == "nf4g64" and f.bits_per_weight() == 4.5  # 4 + 32/64
    dq = QuantFormat(bits=4, group_size=64, kind="fp4", double_quant=True)
    assert dq.short_name() == "fp4g64dq" and dq.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (256 * 64))
    with pytest.raises(ConfigError, match="quantizer.format.bits"):
        QuantFormat(bits=3, kind="nf4")
    with pytest.raises(ConfigError, match="quantizer.format.double_quant"):
        QuantFormat(bits=4, double_quant=True)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_rtn_with_a_codebook_format_equals_the_reference_on_every_linear(tiny, tmp_path, kind, double_quant):
    from quantlab.formats.spec import QuantFormat
    from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
    from quantlab.types import RunContext

    model, _ = tiny
    fmt = QuantFormat(bits=4, group_size=32, kind=kind, scale_bits=32, double_quant=double_quant)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    q = RTNQuantizer(RTNConfig(format=fmt))
    q.validate(model)
    res = q.quantize(model, None, RunContext(device="cpu", seed=0, output_dir=tmp_path))
    assert "lm_head" not in res.quantized_layers and res.quantized_layers
    for name in res.quantized_layers:
        expect = fake_quantize_codebook(before[name], kind, 32, double_quant=double_quant)
        assert torch.equal(model.get_submodule(name).weight, expect)


def test_integer_only_methods_refuse_codebook_formats(tiny):
    from quantlab.errors import ConfigError
    from quantlab.formats.spec import QuantFormat
    from quantlab.quantizers.gptq import GPTQConfig, GPTQQuantizer

    with pytest.raises(ConfigError, match="quantizer.format.kind"):
        GPTQQuantizer(GPTQConfig(format=QuantFormat(bits=4, group_size=32, kind="nf4"))).validate(tiny[0])


@pytest.mark.slow  # a 4-job subprocess sweep; the default suite runs nf4_ref/fp4_ref through the CLI in
# test_cli.py::test_every_quantizer_runs_end_to_end and their double quantization in-process above
def test_cli_nf4_ref_and_fp4_dq(tmp_path):
    import json

    from conftest import run_cli

    proc = run_cli(["-m", "+exp=demo_tiny", "quantizer=nf4_ref,fp4_ref", "quantizer.format.double_quant=false,true",
                    "eval=[ppl_local]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("result.json")]
    got = sorted((r["format"]["short_name"], r["bits_per_weight"]) for r in recs)
    assert [g[0] for g in got] == ["fp4g64", "fp4g64dq", "nf4g64", "nf4g64dq"]
    assert all(r["status"] == "ok" and r["metrics"]["ppl/local_stdlib"] > 1 for r in recs)
