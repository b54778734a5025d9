"""SmoothQuant W8A8: activation fake quantization, swapped Linears, accuracy, artifacts, config errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import as_sequences as _as_sequences
from conftest import cpu_ctx as _ctx
from conftest import random_calib as _calib

from quantlab.calib.stats import collect_group_absmax, group_key
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.nn.qat import QATLinear, QATSpec, swap_act_quant, sym_minmax_fake_quant
from quantlab.quantizers.artifacts import save_artifacts
from quantlab.quantizers.smoothquant import SmoothQuantConfig, SmoothQuantQuantizer, norm_groups

CPU = torch.device("cpu")


def quantize_per_token_absmax(x, bits=8):  # SmoothQuant's A8 per token, through the one implementation
    return sym_minmax_fake_quant(x, bits, -1, "smoothquant")


def quantize_per_tensor_absmax(x, bits=8):
    return sym_minmax_fake_quant(x, bits, None, "smoothquant")


GROUP_QKV = "input_layernorm->q_proj,k_proj,v_proj"
GROUP_MLP = "post_attention_layernorm->gate_proj,up_proj"


def _held_out() -> torch.Tensor:
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------ activation quantizers
def test_per_token_quantizer_matches_reference_formula():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1)
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127  # smoothquant fake_quant.py
    assert torch.equal(quantize_per_token_absmax(x), torch.round(x / s) * s)
    codes = quantize_per_token_absmax(x) / s
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    # every token reaches +-127 (its own max): the scale really is per token
    assert torch.allclose(codes.abs().amax(dim=-1), torch.full((3, 5), 127.0))


def test_per_tensor_quantizer_grid_and_exact_points():
    x = torch.tensor([[1.0, -3.0, 0.0, 127.0]])
    assert torch.equal(quantize_per_token_absmax(x), x)  # on the grid: s = 1
    assert torch.equal(quantize_per_tensor_absmax(torch.tensor([0.5, 1.5, 2.5, 127.0])), torch.tensor([0.0, 2.0, 2.0, 127.0]))
    y = quantize_per_tensor_absmax(torch.randn(4, 16))
    assert len(torch.unique(y)) <= 255
    assert torch.equal(quantize_per_token_absmax(torch.zeros(2, 4)), torch.zeros(2, 4))  # floor: no 0/0
    assert quantize_per_token_absmax(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    lowbit = quantize_per_token_absmax(torch.randn(6, 32), bits=4)
    assert all(len(torch.unique(r)) <= 15 for r in lowbit)


def test_act_quant_linear_is_a_linear_sharing_parameters():
    lin = torch.nn.Linear(16, 8)
    q = QATLinear.from_linear(lin, QATSpec(a_bits=8, arith="smoothquant", a_granularity="per_tensor"))
    assert isinstance(q, torch.nn.Linear) and q.weight is lin.weight and q.bias is lin.bias
    a = torch.randn(2, 3, 16)
    assert torch.equal(q(a), F.linear(quantize_per_tensor_absmax(a), lin.weight, lin.bias))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert swap_act_quant(model, ["0"]) == ["0"] and swap_act_quant(model, ["0"]) == []
    assert isinstance(model[0], QATLinear) and "a8 (minmax, per_token)" in repr(model)


# ------------------------------------------------------------------ the quantizer
def test_w8a8_close_to_fp_and_activations_quantized(tmp_path, monkeypatch):
    x = _held_out()
    fp, _ = build_tiny_llama()
    ref = _logits(fp, x)
    model, _ = build_tiny_llama()
    res = SmoothQuantQuantizer(SmoothQuantConfig()).quantize(model, _calib(), _ctx(tmp_path, keep=True))
    # measured logits MSE vs fp: 0.0093 (W8A8, alpha 0.5); fp logit variance 1.22; w4 g32 RTN gives 0.32
    assert ((_logits(model, x) - ref) ** 2).mean().item() < 0.05
    swapped = [n for n, m in model.named_modules() if isinstance(m, QATLinear) and m.spec.arith == "smoothquant"]
    assert sorted(swapped) == res.quantized_layers and len(swapped) == 14 and not isinstance(model.lm_head, QATLinear)
    assert res.summary["smoothed_groups"] == [GROUP_QKV, GROUP_MLP]  # o_proj, down_proj: not smoothed
    # what reaches the matmul of a swapped layer is on a per-token int8 grid
    seen = {}
    down = model.model.layers[1].mlp.down_proj
    linear = F.linear

    def spy(inp, w, b=None):
        if w is down.weight:
            seen["x"] = inp
        return linear(inp, w, b)

    monkeypatch.setattr(F, "linear", spy)
    _logits(model, x)
    monkeypatch.undo()
    xq = seen["x"]
    codes = xq / (xq.abs().amax(dim=-1, keepdim=True) / 127)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and len(torch.unique(codes[0, 0].round())) <= 255
    # weights: int8 per output channel of the smoothed weights
    q = model.model.layers[0].self_attn.q_proj
    ref_w = res.reference_weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.weight.data, affine.fake_quantize(ref_w, SmoothQuantConfig().format))


def test_artifacts_reapply_exactly_and_keys(tmp_path):
    model, _ = build_tiny_llama()
    cfg = SmoothQuantConfig(alpha=0.85)
    res = SmoothQuantQuantizer(cfg).quantize(model, _calib(), _ctx(tmp_path))
    assert set(res.artifacts) == {"smoothquant.alpha"} | {
        f"smooth.model.layers.{i}.{g}" for i in range(2) for g in (GROUP_QKV, GROUP_MLP)}
    assert res.artifacts["smoothquant.alpha"].dim() == 0 and float(res.artifacts["smoothquant.alpha"]) == 0.85
    path = save_artifacts(tmp_path / "s.safetensors", res.artifacts, "smoothquant", cfg.to_dict())
    fresh, _ = build_tiny_llama()
    again = SmoothQuantQuantizer(SmoothQuantConfig(load_artifacts=str(path))).quantize(fresh, None, _ctx(tmp_path))
    assert again.summary["alpha"] == 0.85 and again.summary["loaded_from"] == str(path)
    x = _held_out()
    assert torch.equal(_logits(fresh, x), _logits(model, x))


def test_per_tensor_granularity_and_scales_match_eq6(tmp_path):
    model, _ = build_tiny_llama()
    mapping = get_mapping(model)
    stats = collect_group_absmax(model, mapping, _calib().tokens, device=CPU)
    block = model.model.layers[0]
    w = torch.cat([block.self_attn.q_proj.weight, block.self_attn.k_proj.weight, block.self_attn.v_proj.weight]).abs().amax(0)
    expect = (stats[f"model.layers.0.{GROUP_QKV}"].clamp(min=1e-5).sqrt() / w.clamp(min=1e-5).sqrt()).clamp(min=1e-5)
    res = SmoothQuantQuantizer(SmoothQuantConfig(act_granularity="per_tensor")).quantize(model, _calib(), _ctx(tmp_path))
    assert torch.allclose(res.artifacts[f"smooth.model.layers.0.{GROUP_QKV}"], expect, rtol=1e-6)
    assert model.model.layers[0].mlp.up_proj.spec.a_granularity == "per_tensor"
    assert [g.key for g in norm_groups(mapping, build_tiny_llama(num_key_value_heads=4)[0].model.layers[0])] == [GROUP_QKV, GROUP_MLP]


@pytest.mark.parametrize("field, value", [
    ("alpha", -0.1), ("alpha", True), ("act_granularity", "per_row"), ("act_bits", 1), ("batch_size", 0),
])
def test_config_errors_name_the_key(field, value):
    with pytest.raises(ConfigError, match=f"quantizer.{field}"):
        SmoothQuantConfig(**{field: value})


def test_lm_head_target_is_refused_and_calib_required(tmp_path):
    model, _ = build_tiny_llama()
    with pytest.raises(ConfigError, match="quantizer.exclude"):
        SmoothQuantQuantizer(SmoothQuantConfig(exclude=())).validate(model)
    with pytest.raises(ConfigError, match="calib"):
        SmoothQuantQuantizer(SmoothQuantConfig()).quantize(model, None, _ctx(tmp_path))


# ------------------------------------------------------------------ variable-length calibration data

def test_equal_length_sequences_match_the_tensor_path(tmp_path):
    model, _ = build_tiny_llama()
    mapping = get_mapping(model)
    for bs in (None, 3):
        a = collect_group_absmax(model, mapping, _calib().tokens, device=CPU, batch_size=bs)
        b = collect_group_absmax(model, mapping, _as_sequences(_calib()).tokens, device=CPU, batch_size=bs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sds = []
    for calib in (_calib(), _as_sequences(_calib())):
        m, _ = build_tiny_llama()
        res = SmoothQuantQuantizer(SmoothQuantConfig()).quantize(m, calib, _ctx(tmp_path))
        sds.append((m.state_dict(), res.artifacts))
    assert all(torch.equal(sds[0][0][k], sds[1][0][k]) for k in sds[0][0])
    assert all(torch.equal(sds[0][1][k], sds[1][1][k]) for k in sds[0][1])


def test_variable_length_absmax_equals_a_per_sequence_reference():
    """max|x| per channel over every real token == the max over each sequence run ALONE through the model."""
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (7, 12, 7, 3, 12, 9)]
    model, _ = build_tiny_llama(dtype=torch.float64, num_key_value_heads=4)  # v->o applicable too
    mapping = get_mapping(model)
    stats = collect_group_absmax(model, mapping, seqs, device=CPU, batch_size=2)
    ref, hooks = {}, []
    for i, block in enumerate(mapping.blocks(model)):
        for grp in mapping.applicable_groups(block):
            key = group_key(f"model.layers.{i}", grp)

            def hook(_m, args, key=key):
                m = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
                ref[key] = m if key not in ref else torch.maximum(ref[key], m)

            hooks.append(block.get_submodule(grp.linears[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    for h in hooks:
        h.remove()
    assert stats.keys() == ref.keys() and len(ref) == 2 * 4
    for k in ref:  # batched vs single matmuls: <= 1e-13 apart in float64
        assert torch.allclose(stats[k], ref[k], rtol=1e-12, atol=0), k
