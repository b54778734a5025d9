"""SmoothQuant+: exact smoothing, the whole-model loss, the alpha search, quality vs RTN, artifacts, config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import as_sequences as _as_sequences
from conftest import compose
from conftest import cpu_ctx as _ctx
from conftest import random_calib as _calib

from quantlab.algorithms import alpha_search as AS
from quantlab.algorithms.smoothing import fold_group_scales, group_scales
from quantlab.calib.stats import collect_group_absmax, group_key
from quantlab.cli import build_spec
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers import smoothquant_plus as SQP
from quantlab.quantizers.artifacts import save_artifacts
from quantlab.quantizers.smoothquant_plus import (
    SmoothQuantPlusConfig,
    SmoothQuantPlusQuantizer,
    smoothed_groups,
)
from quantlab.tracking.record import write_table
from quantlab.tracking.variant import variant_settings
from quantlab.types import CalibData, tokens_sha256

CPU = torch.device("cpu")
FMT = QuantFormat(bits=4, group_size=32)  # tiny model: hidden 64, so g32 gives 2 groups per row
VO = "self_attn.v_proj->o_proj"


def _held_out() -> torch.Tensor:
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _targets(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")


# ------------------------------------------------------------------ eq. 5 / eq. 6
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smoothing_alone_leaves_fp_model_unchanged(kv_heads, alpha):
    """Eq. 5 with eq. 6 scales for every group (up->down; v->o without GQA) is an identity of the fp model."""
    model, _ = build_tiny_llama(dtype=torch.float64, num_key_value_heads=kv_heads)
    mapping = get_mapping(model)
    x = _held_out()
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
    gain0 = model.model.layers[0].input_layernorm.weight.detach().clone()
    stats = collect_group_absmax(model, mapping, _calib().tokens, device=CPU)
    keys = set()
    for i, block in enumerate(mapping.blocks(model)):
        groups = mapping.applicable_groups(block)
        keys |= {g.key for g in groups}
        fold_group_scales(block, groups, group_scales(block, groups, {g.key: stats[group_key(f"model.layers.{i}", g)] for g in groups}, alpha))
    assert (VO in keys) == (kv_heads == 4) and "mlp.up_proj->down_proj" in keys
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, gain0)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    # measured: logits max |diff| 0.0 (HF's RMSNorm rounds its input to float32, which absorbs float64
    # rounding noise), residual stream after block 0: <= 2.3e-13 on values of magnitude ~10-100
    assert (out.logits - ref.logits).abs().max().item() <= 1e-6
    assert (out.hidden_states[1] - ref.hidden_states[1]).abs().max().item() <= 1e-9


def test_gram_logits_mse_equals_explicit_logits_mse():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True, dtype=torch.float64)
    torch.nn.init.normal_(head.weight, generator=g)
    hq, hf = (torch.randn(2, 10, 16, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        explicit = ((head(hq) - head(hf)) ** 2).mean().item() * 20  # the bias cancels
        assert AS.loss_sum("logits_mse", hq, hf, head, AS.gram(head.weight)) == pytest.approx(explicit, rel=1e-12)
        assert AS.loss_sum("hidden_mse", hq, hf, head) == pytest.approx(((hq - hf) ** 2).mean().item() * 20, rel=1e-12)
        assert AS.loss_sum("kl", hf, hf, head) == pytest.approx(0.0, abs=1e-9) and AS.loss_sum("kl", hq, hf, head) > 0


def test_search_loss_is_the_final_models_logits_mse(tmp_path):
    """The search's loss for an alpha == the explicit logits MSE of the model quantized with it (float64)."""
    fp, _ = build_tiny_llama(dtype=torch.float64)
    calib = _calib()
    ref = _logits(fp, calib.tokens)
    res = AS.search_alpha(fp, get_mapping(fp), calib.tokens, groups_fn=lambda b: smoothed_groups(get_mapping(fp), b, False),
                          targets=_targets(fp), alphas=[0.35], fmt=FMT, loss="logits_mse", device=CPU)
    assert torch.equal(_logits(fp, calib.tokens), ref)  # the search leaves the original parameters in place
    model, _ = build_tiny_llama(dtype=torch.float64)
    SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, alpha=0.35)).quantize(model, calib, _ctx(tmp_path))
    explicit = ((_logits(model, calib.tokens) - ref) ** 2).mean().item()
    assert res.losses[0] == pytest.approx(explicit, rel=1e-9)
    rtn, _ = build_tiny_llama(dtype=torch.float64)
    for name in _targets(rtn):
        w = rtn.get_submodule(name).weight
        w.data = affine.fake_quantize(w.data, FMT)
    assert res.rtn_loss == pytest.approx(((_logits(rtn, calib.tokens) - ref) ** 2).mean().item(), rel=1e-9)


def _hand_quantized(alpha: float | None, tokens: torch.Tensor) -> torch.nn.Module:
    """Independent reference: the float64 tiny model smoothed by hand with eq. (6) scales (1e-5 floors, max|x|
    of each group's input in the fp model, max|W| over the concatenated consumers) folded by eq. (5) into
    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj rows -> down_proj; then every
    decoder Linear RTN-rounded with ``affine.fake_quantize``. ``alpha=None``: plain RTN."""
    model, _ = build_tiny_llama(dtype=torch.float64)
    layers = model.model.layers
    xmax: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def pre(_mod, args):
            m = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            xmax[key] = m if key not in xmax else torch.maximum(xmax[key], m)
        return pre

    handles = [getattr(getattr(layer, part), lin).register_forward_pre_hook(hook((i, lin)))
               for i, layer in enumerate(layers) for part, lin in
               (("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj"))]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()

    def s_of(x, ws):
        w = torch.cat([w.abs() for w in ws]).amax(0)
        return (x.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for i, layer in enumerate(layers if alpha is not None else []):
            att, mlp = layer.self_attn, layer.mlp
            s = s_of(xmax[i, "q_proj"], [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            layer.input_layernorm.weight /= s
            for lin in (att.q_proj, att.k_proj, att.v_proj):
                lin.weight *= s
            s = s_of(xmax[i, "gate_proj"], [mlp.gate_proj.weight, mlp.up_proj.weight])
            layer.post_attention_layernorm.weight /= s
            mlp.gate_proj.weight *= s
            mlp.up_proj.weight *= s
            s = s_of(xmax[i, "down_proj"], [mlp.down_proj.weight])
            mlp.up_proj.weight /= s[:, None]
            mlp.down_proj.weight *= s
        for name in _targets(model):
            w = model.get_submodule(name).weight
            w.copy_(affine.fake_quantize(w, FMT))
    return model


def _final_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output after the final norm (transformers' ``last_hidden_state``), checked to
    be exactly what lm_head reads."""
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state
        assert torch.equal(model.lm_head(h), model(tokens).logits)
    return h


def test_hidden_mse_is_the_final_norm_output_mse_of_the_hand_quantized_model():
    """hidden_mse for alpha 0.35 (and plain RTN) == mean over tokens and hidden dims of the squared difference
    of the final-norm outputs of the hand-smoothed+rounded model and the fp model (float64); a logits_mse
    search records the same hidden_mse next to its own loss."""
    calib = _calib()
    fp, _ = build_tiny_llama(dtype=torch.float64)
    mapping = get_mapping(fp)
    kw = {"groups_fn": lambda b: smoothed_groups(mapping, b, False), "targets": _targets(fp),
          "alphas": [0.35], "fmt": FMT, "device": CPU}
    res = AS.search_alpha(fp, mapping, calib.tokens, loss="hidden_mse", **kw)
    other = AS.search_alpha(fp, mapping, calib.tokens, loss="logits_mse", **kw)
    h_fp = _final_hidden(fp, calib.tokens)
    hand = {a: _final_hidden(_hand_quantized(a, calib.tokens), calib.tokens) for a in (0.35, None)}
    expect, expect_rtn = (((hand[a] - h_fp) ** 2).mean().item() for a in (0.35, None))
    # measured (float64, w4 g32): hidden_mse 0.1679 (RTN 0.2785), logits_mse 0.1668 (RTN 0.2799)
    assert res.loss == "hidden_mse" and res.losses[0] == pytest.approx(expect, rel=1e-9)
    assert res.rtn_loss == pytest.approx(expect_rtn, rel=1e-9)
    assert res.hidden_mse == res.losses and res.rtn_hidden_mse == res.rtn_loss
    assert other.loss == "logits_mse" and other.hidden_mse == res.losses
    assert other.rtn_hidden_mse == res.rtn_loss
    assert other.losses[0] != pytest.approx(expect, rel=1e-3)  # a different quantity


def test_hidden_mse_search_picks_the_argmin_of_its_own_curve_and_names_its_loss(tmp_path):
    cfg = {"format": FMT, "alpha_step": 0.125}
    res = {}
    for loss in ("hidden_mse", "logits_mse"):
        model, _ = build_tiny_llama()
        res[loss] = SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(loss=loss, **cfg)).quantize(
            model, _calib(), _ctx(tmp_path / loss))
    rows = res["hidden_mse"].tables["alpha_search"]
    summary = res["hidden_mse"].summary
    best = min(range(len(rows)), key=lambda i: rows[i]["loss"])
    assert [r["chosen"] for r in rows] == [i == best for i in range(len(rows))]
    assert summary["alpha"] == rows[best]["alpha"] and summary["best_loss"] == rows[best]["loss"]
    assert summary["loss"] == "hidden_mse" and all(r["loss_name"] == "hidden_mse" for r in rows)
    assert all(r["hidden_mse"] == r["loss"] for r in rows)
    assert summary["hidden_mse_best"] == summary["best_loss"]
    assert summary["hidden_mse_rtn"] == summary["loss_rtn"]
    # the default search records its own loss, named, and the same hidden_mse column
    lrows, lsum = res["logits_mse"].tables["alpha_search"], res["logits_mse"].summary
    assert lsum["loss"] == "logits_mse" and all(r["loss_name"] == "logits_mse" for r in lrows)
    assert [r["hidden_mse"] for r in lrows] == [r["loss"] for r in rows]
    assert [r["loss"] for r in lrows] != [r["loss"] for r in rows]
    assert lsum["hidden_mse_best"] == next(r["hidden_mse"] for r in lrows if r["chosen"])
    # the written table (alpha_search.json) keeps the loss name with every value
    write_table(rows, tmp_path, "alpha_search")
    back = json.loads((tmp_path / "alpha_search.json").read_text())
    expect = [(r["alpha"], r["loss"], "hidden_mse") for r in rows]
    assert [(r["alpha"], r["loss"], r["loss_name"]) for r in back] == expect


def test_label_shows_a_non_default_search_loss():
    def label(**kw):
        return SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(**kw)).label("float32")

    base = label()
    assert "loss:" not in base and base.startswith("smoothquant_plus ")
    for loss in ("hidden_mse", "kl"):
        assert label(loss=loss) == f"{base} loss:{loss}"
    # a given alpha runs no search: the loss does not matter and is not shown
    assert label(alpha=0.5, loss="hidden_mse") == label(alpha=0.5)


def test_default_loss_composes_as_documented():
    """The YAML's default is logits_mse (quantlab's choice, = the config's); loss is part of the variant."""
    spec = build_spec(compose(["quantizer=smoothquant_plus"]))
    assert spec.quantizer.loss == "logits_mse" == SmoothQuantPlusConfig().loss == SQP.DEFAULT_LOSS
    other = build_spec(compose(["quantizer=smoothquant_plus", "quantizer.loss=hidden_mse"]))
    assert other.quantizer.loss == "hidden_mse"
    a, b = variant_settings(spec)["quantizer"]["config"], variant_settings(other)["quantizer"]["config"]
    assert (a["loss"], b["loss"]) == ("logits_mse", "hidden_mse")
    assert {**a, "loss": None} == {**b, "loss": None}


@pytest.mark.parametrize("fmt", [FMT, QuantFormat(bits=3, group_size=16), QuantFormat(bits=4, group_size=-1),
                                 QuantFormat(bits=8, group_size=-1, symmetric=True), QuantFormat(zero_in_range=True, group_size=32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_rtn_is_bit_identical(fmt, dtype):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)
    w[0] = 0.0
    w[1, :32] = 1e-7
    w = w.to(dtype)
    q, scale, zero = affine.quantize_weight(w, fmt)  # the codes path
    expect = affine.dequantize(q, scale, zero, fmt).to(w.dtype)
    assert torch.equal(affine.fake_quantize(w, fmt), expect)
    affine.fake_quantize_(w, fmt)
    assert torch.equal(w, expect)


# ------------------------------------------------------------------ the search
def test_search_curve_argmin_plot_and_quality_vs_rtn(tmp_path):
    x = _held_out()
    fp, _ = build_tiny_llama()
    ref = _logits(fp, x)
    model, _ = build_tiny_llama()
    res = SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT)).quantize(model, _calib(), _ctx(tmp_path))
    rows = res.tables["alpha_search"]
    assert len(rows) == 21 and [r["alpha"] for r in rows] == [round(0.05 * i, 9) for i in range(21)]
    best = min(rows, key=lambda r: r["loss"])
    assert best["chosen"] and sum(r["chosen"] for r in rows) == 1 and res.summary["alpha"] == best["alpha"]
    assert res.summary["best_loss"] == best["loss"] and res.summary["loss_alpha0"] == rows[0]["loss"]
    assert res.summary["searched"] is True and res.summary["n_alphas"] == 21 and res.summary["search_samples"] == 8
    assert res.summary["smoothed_groups"] == ["input_layernorm->q_proj,k_proj,v_proj",
                                              "post_attention_layernorm->gate_proj,up_proj", "mlp.up_proj->down_proj"]
    png = Path(res.images["alpha_search"])
    assert png == tmp_path / "alpha_search.png" and png.read_bytes()[:4] == b"\x89PNG"
    # measured (w4 g32, tiny outlier model): calibration loss 0.154 at alpha 0.6 vs RTN 0.280, alpha 0: 0.354;
    # held-out logits MSE vs fp: SmoothQuant+ 0.168 vs RTN 0.320 (w3 g32: 0.435 vs 0.712)
    assert res.summary["best_loss"] < 0.75 * res.summary["loss_rtn"]
    rtn, _ = build_tiny_llama()
    for name in _targets(rtn):
        rtn.get_submodule(name).weight.data = affine.fake_quantize(rtn.get_submodule(name).weight.data, FMT)
    assert ((_logits(model, x) - ref) ** 2).mean() < 0.75 * ((_logits(rtn, x) - ref) ** 2).mean()


def test_waves_and_search_samples(tmp_path):
    fp, _ = build_tiny_llama(num_key_value_heads=4)
    mapping = get_mapping(fp)
    kw = {"groups_fn": lambda b: smoothed_groups(mapping, b, True), "targets": _targets(fp), "alphas": [0.0, 1.0],
          "fmt": FMT, "loss": "hidden_mse", "device": CPU, "batch_size": 3}
    one = AS.search_alpha(fp, mapping, _calib().tokens, **kw)
    waves = AS.search_alpha(fp, mapping, _calib().tokens, alpha_batch=1, **kw)
    assert one.losses == waves.losses and one.rtn_loss == waves.rtn_loss  # bounded memory, same numbers
    part = AS.search_alpha(fp, mapping, _calib().tokens, search_samples=5, rtn_baseline=False, **kw)
    assert part.n_samples == 5 and part.n_tokens == 5 * 64 and part.rtn_loss is None
    assert all(torch.equal(part.stats[k], one.stats[k]) for k in one.stats)  # statistics: still every sample
    assert part.losses != one.losses


def test_non_finite_candidate_is_dropped_not_fatal(tmp_path, monkeypatch):
    real = AS.smoothquant_scales

    def broken_at_one(act, w, alpha):
        s = real(act, w, alpha)
        return torch.full_like(s, float("inf")) if alpha == 1.0 else s

    monkeypatch.setattr(AS, "smoothquant_scales", broken_at_one)
    model, _ = build_tiny_llama()
    res = SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, alpha_step=0.5)).quantize(model, _calib(), _ctx(tmp_path))
    losses = [r["loss"] for r in res.tables["alpha_search"]]
    assert losses[-1] == float("inf") and all(v < float("inf") for v in losses[:2]) and res.summary["alpha"] < 1.0
    assert Path(res.images["alpha_search"]).is_file()


def test_given_alpha_skips_search_and_reapplies_exactly(tmp_path, monkeypatch):
    def no_search(*_a, **_k):
        raise AssertionError("searched although alpha was given")

    monkeypatch.setattr(SQP, "search_alpha", no_search)
    model, _ = build_tiny_llama()
    cfg = SmoothQuantPlusConfig(format=FMT, alpha=0.55, smooth_vo=True)
    res = SmoothQuantPlusQuantizer(cfg).quantize(model, _calib(), _ctx(tmp_path, keep=True))
    assert res.summary["searched"] is False and res.summary["alpha"] == 0.55 and not res.tables and not res.images
    assert VO not in res.summary["smoothed_groups"]  # GQA (4 heads / 2 kv heads): not exact, not done
    assert set(res.artifacts) == {"smoothquant_plus.alpha"} | {
        f"smooth.model.layers.{i}.{g}" for i in range(2) for g in res.summary["smoothed_groups"]}
    assert res.artifacts["smoothquant_plus.alpha"].dim() == 0
    # reference weights: smoothed, not yet rounded
    ref_w = res.reference_weights
    assert set(ref_w) == set(res.quantized_layers)
    assert all(torch.equal(model.get_submodule(n).weight.data, affine.fake_quantize(w, FMT)) for n, w in ref_w.items())
    path = save_artifacts(tmp_path / "a.safetensors", res.artifacts, "smoothquant_plus", cfg.to_dict())
    fresh, _ = build_tiny_llama()
    again = SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, load_artifacts=str(path), smooth_vo=True))
    assert again.quantize(fresh, None, _ctx(tmp_path)).summary["alpha"] == 0.55
    assert torch.equal(_logits(fresh, _held_out()), _logits(model, _held_out()))


def test_searched_result_reapplies_exactly_and_smooth_vo_mismatch_is_refused(tmp_path):
    model, _ = build_tiny_llama(num_key_value_heads=4)
    cfg = SmoothQuantPlusConfig(format=FMT, smooth_vo=True, alpha_step=0.25, search_samples=4)
    res = SmoothQuantPlusQuantizer(cfg).quantize(model, _calib(), _ctx(tmp_path))
    assert VO in res.summary["smoothed_groups"] and len(res.tables["alpha_search"]) == 5
    assert res.summary["search_samples"] == 4 and res.summary["search_tokens"] == 4 * 64
    path = save_artifacts(tmp_path / "a.safetensors", res.artifacts, "smoothquant_plus", cfg.to_dict())
    fresh, _ = build_tiny_llama(num_key_value_heads=4)
    SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, smooth_vo=True, load_artifacts=str(path))).quantize(
        fresh, None, _ctx(tmp_path))
    assert torch.equal(_logits(fresh, _held_out()), _logits(model, _held_out()))
    other, _ = build_tiny_llama(num_key_value_heads=4)
    with pytest.raises(ConfigError, match="quantizer.load_artifacts"):
        SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, load_artifacts=str(path))).quantize(other, None, _ctx(tmp_path))


@pytest.mark.parametrize("field, value", [
    ("alpha", 1.5), ("alpha_min", -0.1), ("alpha_step", 0), ("loss", "l1"), ("smooth_vo", "yes"),
    ("weight_max", "mean"), ("search_samples", 0), ("alpha_batch", 1.5), ("rtn_baseline", None),
])
def test_config_errors_name_the_key(field, value):
    with pytest.raises(ConfigError, match=f"quantizer.{field}"):
        SmoothQuantPlusConfig(**{field: value})


def test_config_grid_and_defaults():
    cfg = SmoothQuantPlusConfig()
    assert cfg.format == QuantFormat(bits=4, group_size=128, symmetric=False, zero_in_range=False)
    assert len(cfg.grid()) == 21 and cfg.grid()[-1] == 1.0 and cfg.weight_max == "concat"
    assert SmoothQuantPlusConfig(alpha_min=0.2, alpha_max=0.6, alpha_step=0.1).grid() == [0.2, 0.3, 0.4, 0.5, 0.6]
    with pytest.raises(ConfigError, match="quantizer.alpha_max"):
        SmoothQuantPlusConfig(alpha_min=0.6, alpha_max=0.2)


# ------------------------------------------------------------------ variable-length calibration data

def test_equal_length_sequences_match_the_tensor_path():
    fp, _ = build_tiny_llama()
    mapping = get_mapping(fp)
    kw = {"groups_fn": lambda b: smoothed_groups(mapping, b, False), "targets": _targets(fp), "alphas": [0.0, 0.5],
          "fmt": FMT, "loss": "logits_mse", "device": CPU, "batch_size": 3}
    for n in (None, 5):
        a = AS.search_alpha(fp, mapping, _calib().tokens, search_samples=n, **kw)
        b = AS.search_alpha(fp, mapping, _as_sequences(_calib()).tokens, search_samples=n, **kw)
        assert a.losses == b.losses and a.rtn_loss == b.rtn_loss and (a.n_samples, a.n_tokens) == (b.n_samples, b.n_tokens)
        assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)


def test_variable_length_search_loss_is_the_per_sequence_logits_mse(tmp_path):
    """search_samples=3 on prompts of different lengths: the loss == the logits MSE of the model quantized
    with that alpha (statistics from all sequences) over the first 3 sequences, each run alone."""
    g = torch.Generator().manual_seed(5)
    seqs = tuple(torch.randint(0, 256, (n,), generator=g) for n in (20, 9, 33, 9, 20, 14))
    calib = CalibData(seqs, "random", 6, 33, 0, tokens_sha256(seqs))
    fp, _ = build_tiny_llama(dtype=torch.float64)
    mapping = get_mapping(fp)
    res = AS.search_alpha(fp, mapping, calib.tokens, groups_fn=lambda b: smoothed_groups(mapping, b, False),
                          targets=_targets(fp), alphas=[0.35], fmt=FMT, loss="logits_mse", device=CPU,
                          search_samples=3, rtn_baseline=False, batch_size=1)
    assert res.n_samples == 3 and res.n_tokens == 20 + 9 + 33
    model, _ = build_tiny_llama(dtype=torch.float64)
    SmoothQuantPlusQuantizer(SmoothQuantPlusConfig(format=FMT, alpha=0.35)).quantize(model, calib, _ctx(tmp_path))
    total = sum(((_logits(model, s[None]) - _logits(fp, s[None])) ** 2).mean(-1).sum().item() for s in seqs[:3])
    assert res.losses[0] == pytest.approx(total / res.n_tokens, rel=1e-9)
