"""QuantFormat, the affine reference quantizer (formats/affine.py) and RTN/None on the tiny model.

Hand-computed cases are exact (atol=0); properties follow torchao's ``check_idempotent`` and the
invariants in reference/architecture-and-style.md §3.7; conventions in
reference/quantization-algorithms.md §0.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers.none import NoneConfig, NoneQuantizer
from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
from quantlab.types import RunContext

BITS = range(2, 9)
GROUPS = (32, 128, -1)


def _t(rows: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def _randn(shape: tuple[int, int], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _ctx() -> RunContext:
    return RunContext(device=torch.device("cpu"), seed=0, output_dir=Path("."))


def _expand(p: torch.Tensor, fmt: QuantFormat, in_features: int) -> torch.Tensor:
    """Per-group parameter (out, n_groups) -> per-weight (out, in)."""
    return p.repeat_interleave(fmt.effective_group_size(in_features), dim=1)


# --------------------------------------------------------------------------- hand-computed cases


def test_awq_style_2bit_hand_case():
    # min=-1, max=2: s = 3/3 = 1, z = clamp(-round(-1), 0, 3) = 1; w/s rounds half-to-even
    # (round(-0.5) = -0, round(0.5) = 0), so q = [-1, 0, 0, 0, 1, 2] + 1.
    fmt = QuantFormat(bits=2, group_size=6, symmetric=False)
    w = _t([[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]])
    q, s, z = affine.quantize_weight(w, fmt)
    _exact(s, _t([[1.0]]))
    _exact(z, _t([[1.0]]))
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 1, 1, 1, 2, 3]]
    _exact(affine.fake_quantize(w, fmt), _t([[-1.0, 0.0, 0.0, 0.0, 1.0, 2.0]]))


def test_awq_style_groups_and_rows_are_independent():
    # row 0: group 0 = the case above, group 1 = 4x it (s=4, z=1, same codes);
    # row 1: group 0 = -w: min=-2, max=1 -> s=1, z=2, w/s=[1,.5,0,-.5,-1,-2] -> round [1,0,0,-0,-1,-2] -> q+2.
    base = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    w = _t([base + [4 * v for v in base], [-v for v in base] + base])
    fmt = QuantFormat(bits=2, group_size=6)
    q, s, z = affine.quantize_weight(w, fmt)
    assert s.shape == z.shape == (2, 2)
    assert s.tolist() == [[1.0, 4.0], [1.0, 1.0]] and z.tolist() == [[1.0, 1.0], [2.0, 1.0]]
    assert q.tolist() == [[0, 1, 1, 1, 2, 3] * 2, [3, 2, 2, 2, 1, 0, 0, 1, 1, 1, 2, 3]]
    expect = [[-1, 0, 0, 0, 1, 2, -4, 0, 0, 0, 4, 8], [1, 0, 0, 0, -1, -2, -1, 0, 0, 0, 1, 2]]
    _exact(affine.fake_quantize(w, fmt), _t(expect))


def test_symmetric_3bit_hand_case():
    # s = max|w| / (2^(3-1) - 1) = 1.5 / 3 = 0.5, z = 2^(3-1) = 4 (restricted range: code 0 unused).
    # w/s = [-3, -1.5, -0.5, 0.5, 1.2, 3] -> round half-to-even [-3, -2, -0, 0, 1, 3] -> q = +4.
    fmt = QuantFormat(bits=3, group_size=-1, symmetric=True)
    w = _t([[-1.5, -0.75, -0.25, 0.25, 0.6, 1.5]])
    q, s, z = affine.quantize_weight(w, fmt)
    assert s.tolist() == [[0.5]] and z.tolist() == [[4.0]]
    assert q.tolist() == [[1, 2, 4, 4, 5, 7]]
    _exact(affine.fake_quantize(w, fmt), _t([[-1.5, -1.0, 0.0, 0.0, 0.5, 1.5]]))


def test_zero_in_range_differs_from_awq_on_all_positive_group():
    w = _t([[0.75, 1.0, 1.5, 2.0, 2.25, 3.0]])
    # GPTQ: range widened to [0, 3] -> s = 1, z = round(-0/1) = 0; q = round(w) = [1, 1, 2, 2, 2, 3].
    gptq = QuantFormat(bits=2, group_size=6, zero_in_range=True)
    q, s, z = affine.quantize_weight(w, gptq)
    assert s.tolist() == [[1.0]] and z.tolist() == [[0.0]] and q.tolist() == [[1, 1, 2, 2, 2, 3]]
    _exact(affine.fake_quantize(w, gptq), _t([[1.0, 1.0, 2.0, 2.0, 2.0, 3.0]]))
    # AWQ: range [0.75, 3] -> s = 2.25/3 = 0.75, z = clamp(-round(1), 0, 3) = 0;
    # w/s = [1, 1.33, 2, 2.67, 3, 4]
    # -> q = [1, 1, 2, 3, 3, clamp(4)=3]: the top value 3.0 is clipped to 2.25 (the documented edge case).
    awq = QuantFormat(bits=2, group_size=6, zero_in_range=False)
    q, s, z = affine.quantize_weight(w, awq)
    assert s.tolist() == [[0.75]] and z.tolist() == [[0.0]] and q.tolist() == [[1, 1, 2, 3, 3, 3]]
    _exact(affine.fake_quantize(w, awq), _t([[0.75, 0.75, 1.5, 2.25, 2.25, 2.25]]))


@pytest.mark.parametrize(
    ("kw", "scale", "zero", "code"),
    [
        (dict(symmetric=True), 1.0, 8.0, 8),  # s = 1 for an all-zero group, z = 2^(b-1)
        # GPTQ: range [-1, 1], s = fl32(2/15); z = round(1/s) = round(7.4999996) = 7, not round(7.5) = 8
        (dict(zero_in_range=True), 2.0 / 15, 7.0, 7),
        (dict(), 1e-5 / 15, 0.0, 0),  # AWQ: range floored at 1e-5, z = 0
    ],
)
def test_all_zero_group(kw, scale, zero, code):
    fmt = QuantFormat(bits=4, group_size=4, **kw)
    w = _t([[0.0, 0.0, 0.0, 0.0, -1.0, 0.5, 0.25, 1.0]])  # group 0 all-zero, group 1 normal
    q, s, z = affine.quantize_weight(w, fmt)
    assert s[0, 0].item() == torch.tensor(scale, dtype=torch.float32).item() and z[0, 0].item() == zero
    assert q[0, :4].tolist() == [code] * 4
    w_hat = affine.fake_quantize(w, fmt)
    assert torch.isfinite(w_hat).all()
    assert w_hat[0, :4].tolist() == [0.0] * 4
    # the neighbouring group keeps its own parameters
    _exact(w_hat[:, 4:], affine.fake_quantize(w[:, 4:], fmt))


@pytest.mark.parametrize("kw", [dict(symmetric=True), dict(zero_in_range=True), dict()])
def test_subnormal_group_is_finite(kw):
    # A float32 group whose largest magnitude is the smallest subnormal: max|w| / maxq underflows to 0.
    fmt = QuantFormat(bits=4, group_size=-1, **kw)
    w = _t([[1e-45, 0.0]])
    w_hat = affine.fake_quantize(w, fmt)
    assert torch.isfinite(w_hat).all(), f"{fmt.short_name()} {kw}: {w_hat.tolist()}"


@pytest.mark.parametrize("kw", [dict(symmetric=True), dict(zero_in_range=True), dict()])
def test_exact_zeros_stay_zero(kw):
    # pruned weights (exact 0) must dequantize to exactly 0 whenever the zero point is an integer
    w = _randn((64, 256))
    w[:, ::3] = 0.0
    w_hat = affine.fake_quantize(w, QuantFormat(bits=3, group_size=32, **kw))
    assert (w_hat[:, ::3] == 0).all()


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "kw", [dict(symmetric=True), dict(), dict(zero_in_range=True)], ids=["sym", "awq", "gptq"]
)
def test_fake_quant_idempotent(kw, bits, gs, dtype):
    fmt = QuantFormat(bits=bits, group_size=gs, **kw)
    w = _randn((32, 256), dtype, seed=bits)
    w1 = affine.fake_quantize(w, fmt)
    w2 = affine.fake_quantize(w1, fmt)
    q1, s1, z1 = affine.quantize_weight(w, fmt)
    q2, s2, z2 = affine.quantize_weight(w1, fmt)
    # the integer part is exactly idempotent in every convention
    assert torch.equal(q1, q2) and torch.equal(z1, z2)
    if fmt.symmetric:
        # s' = fl(fl(qpos * s) / qpos) with s = fl(amax / qpos) gives back s exactly
        # (measured: 0 mismatches in 4e6 random amax per qpos and dtype), so values are exact.
        assert torch.equal(s1, s2) and torch.equal(w1, w2)
        return
    # Asymmetric: s' = fl(fl((maxq-z)s) - fl(-z s)) / maxq differs from s by <= 3 roundings (u = eps/2)
    # in ~10-15% of groups, and w_hat = fl((q-z)s) adds one rounding on each side: bound 5u = 2.5 eps.
    eps = torch.finfo(dtype).eps
    assert ((s2 - s1).abs() <= 1.5 * eps * s1).all()  # measured max 1.00 eps (20 seeds)
    assert ((w2 - w1).abs() <= 2.5 * eps * w1.abs()).all()  # measured max 1.92 eps (20 seeds)


def test_awq_style_not_idempotent_on_clipped_group():
    # Documented consequence of the AWQ convention (z clamped to [0, maxq]): an all-positive group
    # loses its top values, and re-quantizing the result uses a new, narrower range.
    fmt = QuantFormat(bits=2, group_size=6)
    w1 = affine.fake_quantize(_t([[0.75, 1.0, 1.5, 2.0, 2.25, 3.0]]), fmt)  # [.75,.75,1.5,2.25,2.25,2.25]
    # second pass: s = 1.5/3 = 0.5, z = clamp(-round(1.5), 0, 3) = 0, q = clamp(round(w/0.5), 0, 3)
    _exact(affine.fake_quantize(w1, fmt), _t([[1.0, 1.0, 1.5, 1.5, 1.5, 1.5]]))


@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_awq_style_on_grid_and_half_step_error(bits, gs):
    fmt = QuantFormat(bits=bits, group_size=gs)
    w = _randn((64, 256), torch.float64, seed=100 + bits)
    q, s, z = affine.quantize_weight(w, fmt)
    wg = affine.group_view(w, fmt)
    # precondition: every range contains 0, so z is not clamped and nothing is clipped
    assert ((wg.amin(-1) <= 0) & (wg.amax(-1) >= 0)).all()
    w_hat = affine.fake_quantize(w, fmt)
    s_full, z_full = _expand(s, fmt, 256), _expand(z, fmt, 256)
    assert int(q.max()) <= fmt.maxq and (z == torch.round(z)).all()
    _exact(w_hat, (q.double() - z_full) * s_full)  # on the grid
    # every group spans the whole grid: its minimum gets code 0 (z = -round(min/s) cancels exactly)
    # and its maximum code maxq (true for all groups here; a rounding tie could make it maxq - 1)
    assert (affine.group_view(q, fmt).amin(-1) == 0).all()
    assert (affine.group_view(q, fmt).amax(-1) == fmt.maxq).all()
    err = (w - w_hat).abs()
    assert (err <= s_full / 2 * (1 + 1e-12)).all()  # measured max err/s = 0.499998


@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_more_bits_lower_mse(gs, symmetric):
    w = _randn((256, 512), seed=7)
    fmts = [QuantFormat(bits=b, group_size=gs, symmetric=symmetric) for b in BITS]
    mse = [(w - affine.fake_quantize(w, f)).square().mean().item() for f in fmts]
    # measured (g128 asym), bits 2..8: 0.25, 0.046, 0.010, 0.0024, 5.7e-4, 1.4e-4, 3.5e-5 (~4x per bit)
    assert all(a > b for a, b in zip(mse, mse[1:])), mse


@settings(max_examples=30, deadline=None)
@given(
    out=st.integers(1, 3),
    n_groups=st.integers(1, 3),
    g=st.integers(1, 8),
    bits=st.integers(2, 8),
    kind=st.sampled_from(["sym", "awq", "gptq"]),
    per_channel=st.booleans(),
    data=st.data(),
)
def test_codes_in_range_and_dequant_finite(out, n_groups, g, bits, kind, per_channel, data):
    in_f = n_groups * g
    # weight-like magnitudes (fp16 range); subnormal-only groups are test_subnormal_group_is_finite
    vals = data.draw(
        st.lists(
            st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32),
            min_size=out * in_f,
            max_size=out * in_f,
        )
    )
    w = torch.tensor(vals, dtype=torch.float32).reshape(out, in_f)
    gs = -1 if per_channel else g
    fmt = QuantFormat(bits=bits, group_size=gs, symmetric=kind == "sym", zero_in_range=kind == "gptq")
    q, s, z = affine.quantize_weight(w, fmt)
    assert q.shape == w.shape and int(q.min()) >= 0 and int(q.max()) <= fmt.maxq
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(z).all()
    assert torch.isfinite(affine.fake_quantize(w, fmt)).all()


# --------------------------------------------------------------------------- QuantFormat


@pytest.mark.parametrize("bits", [0, 1, 9, True, 4.0])
def test_format_rejects_bits(bits):
    with pytest.raises(ConfigError, match=r"quantizer\.format\.bits") as ei:
        QuantFormat(bits=bits)
    assert ei.value.key == "quantizer.format.bits"


@pytest.mark.parametrize("gs", [0, -2])
def test_format_rejects_group_size(gs):
    with pytest.raises(ConfigError, match=r"quantizer\.format\.group_size"):
        QuantFormat(group_size=gs)


def test_check_layer_names_the_layer():
    fmt = QuantFormat(group_size=48)
    with pytest.raises(ConfigError, match=r"quantizer\.format\.group_size.*model\.layers\.0\.mlp\.up_proj"):
        fmt.check_layer("model.layers.0.mlp.up_proj", 64)
    fmt.check_layer("model.layers.0.mlp.up_proj", 96)  # divisible: no error
    QuantFormat(group_size=-1).check_layer("x", 61)  # per-channel fits any width


def test_bits_per_weight_and_short_name():
    assert QuantFormat(bits=4, group_size=128).bits_per_weight() == 4 + (16 + 4) / 128 == 4.15625
    assert QuantFormat(bits=4, group_size=128, symmetric=True).bits_per_weight() == 4.125
    pc = QuantFormat(bits=8, group_size=-1, symmetric=True)
    assert pc.bits_per_weight(in_features=4096) == 8 + 16 / 4096
    with pytest.raises(ValueError):
        pc.bits_per_weight()
    assert QuantFormat(bits=4, group_size=128).short_name() == "w4g128a"
    assert pc.short_name() == "w8pcs"
    assert QuantFormat(bits=3, group_size=64, symmetric=True).maxq == 7


# --------------------------------------------------------------------------- RTN / None on the tiny model


def _decoder_linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_quantizes_every_decoder_linear_exactly(dtype):
    model, _ = build_tiny_llama(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fmt = QuantFormat(bits=4, group_size=32)
    q = RTNQuantizer(RTNConfig(format=fmt, save_codes=True))
    q.validate(model)
    res = q.quantize(model, None, _ctx())
    assert res.quantized_layers == _decoder_linears(model) and len(res.quantized_layers) == 14
    after = model.state_dict()
    for name in res.quantized_layers:
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        assert w1.dtype == dtype and not torch.equal(w0, w1)
        _exact(w1, affine.fake_quantize(w0, fmt))
        # artifacts reproduce the weight
        a = res.artifacts
        deq = affine.dequantize(a[f"{name}.qweight"], a[f"{name}.scales"], a[f"{name}.zeros"].float(), fmt)
        _exact(deq.to(dtype), w1)
    untouched = [k for k in before if not any(k == f"{n}.weight" for n in res.quantized_layers)]
    assert "lm_head.weight" in untouched and "model.embed_tokens.weight" in untouched
    for k in untouched:
        assert torch.equal(before[k], after[k]), k


def test_rtn_validate_rejects_non_dividing_group():
    model, _ = build_tiny_llama()
    q = RTNQuantizer(RTNConfig(format=QuantFormat(bits=4, group_size=48)))
    match = r"quantizer\.format\.group_size.*model\.layers\.0\.self_attn\.q_proj"
    with pytest.raises(ConfigError, match=match):
        q.validate(model)


def test_none_quantizer_is_bitwise_identity():
    model, _ = build_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = NoneQuantizer(NoneConfig(format=QuantFormat(bits=2)))
    q.validate(model)
    res = q.quantize(model, None, _ctx())
    assert res.quantized_layers == [] and q.format is None
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*mlp*"], ["lm_head"], lambda n: ".mlp." in n),
        (["*"], ["lm_head", "*k_proj", "*v_proj"], lambda n: not n.endswith(("k_proj", "v_proj"))),
        (["model.layers.1.*"], [], lambda n: n.startswith("model.layers.1.")),
    ],
)
def test_rtn_include_exclude(include, exclude, expected):
    model, _ = build_tiny_llama()
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = RTNConfig(include=include, exclude=exclude, format=QuantFormat(bits=3, group_size=32))
    res = RTNQuantizer(cfg).quantize(model, None, _ctx())
    want = [n for n in before if n != "lm_head" and expected(n)]
    assert res.quantized_layers == want and want
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.weight, before[n]) != (n in want), n
