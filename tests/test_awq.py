"""AWQ: the scale/clip math against direct transcriptions of llm-awq, and the method end to end on the tiny model."""
from __future__ import annotations

import pytest
import torch
from conftest import as_sequences as _as_sequences
from conftest import cpu_ctx as _ctx
from conftest import random_calib as _calib
from conftest import varlen_calib as _varlen_calib

from quantlab.algorithms import awq as A
from quantlab.algorithms.smoothing import fold_scales
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers.artifacts import save_artifacts
from quantlab.quantizers.awq import AWQConfig, AWQQuantizer
from quantlab.quantizers.awq_cache import BlockCache, search_sequences, stream_stages
from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer

FMT = QuantFormat(bits=4, group_size=32)  # asymmetric min/max, zero point (the AWQ convention)
VO = "self_attn.v_proj->o_proj"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and a busy 2-core machine makes OpenMP spin: use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EVAL = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))  # held out from _calib


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=EVAL).logits


@pytest.fixture(scope="module")
def fp_logits():
    return _logits(build_tiny_llama()[0])


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory):
    """AWQ w4 g32 on the GQA tiny model (4 heads / 2 kv heads), reference weights kept."""
    model, _ = build_tiny_llama()
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = AWQQuantizer(AWQConfig(format=FMT)).quantize(model, _calib(), _ctx(tmp_path_factory.mktemp("awq"), True))
    return res, orig, _logits(res.model)


# ---------------------------------------------------------------- the math
def test_ratio0_is_identity_and_grid():
    x_mean = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 50
    assert torch.equal(A.candidate_scales(x_mean, 0.0), torch.ones(64))
    assert A.grid_ratios(20) == [i / 20 for i in range(20)]  # 0 .. 0.95, 1.0 never tried
    s = A.candidate_scales(x_mean, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))  # normalised by sqrt(max * min)
    bad = torch.tensor([0.0, float("inf"), 1.0])
    assert torch.isfinite(A.candidate_scales(bad, 0.5)).all()  # inf/NaN entries -> 1


def test_duo_scales_match_autoawq_formula():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(8, 64, generator=g), torch.randn(4, 64, generator=g)]
    x_mean = torch.rand(64, generator=g) + 0.1
    wc = torch.cat(w).abs().reshape(-1, 32)
    w_mean = (wc / (wc.amax(dim=1, keepdim=True) + 1e-6)).reshape(12, 64).mean(0)  # AutoAWQ, verbatim
    assert torch.allclose(A.weight_mean(w, FMT), w_mean)
    ref = (x_mean.pow(0.3) / (w_mean.pow(0.7) + 1e-4)).clamp(min=1e-4)
    assert torch.allclose(A.candidate_scales(x_mean, 0.3, A.weight_mean(w, FMT)), ref / (ref.max() * ref.min()).sqrt())


def _rmsnorm_in_input_dtype(self, hidden_states):
    """HF's LlamaRMSNorm normalises in float32 even for float64 inputs (a 1e-15 change can flip a float32
    rounding and show up as 1e-7); this one keeps float64 so the test measures the fold alone."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("duo", [False, True])
def test_fold_of_any_candidate_keeps_fp_logits(duo, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)
    model, _ = build_tiny_llama(num_key_value_heads=4, dtype=torch.float64)  # no GQA: v->o is a group too
    ref = _logits(model)
    mapping = get_mapping(model)
    g = torch.Generator().manual_seed(0)
    n = 0
    for block in mapping.blocks(model):
        for grp in mapping.applicable_groups(block):
            lins = [block.get_submodule(x).weight for x in grp.linears]
            x_mean = torch.rand(lins[0].shape[1], generator=g, dtype=torch.float64) * 20 + 1e-3
            s = A.candidate_scales(x_mean, 0.65, A.weight_mean(lins, FMT) if duo else None)
            fold_scales(block, grp, s)
            n += 1
    assert n == 8
    # measured max |diff| 3.0e-13 (plain) / 1.4e-13 (duo) on logits up to 5.4 (scales 0.09 .. 10.8)
    assert (_logits(model) - ref).abs().max() <= 1e-10


def test_quadratic_loss_is_the_output_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 30, 64, dtype=torch.float64)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    wq = A.scaled_fake_quant(w, A.candidate_scales(x.abs().mean(0), 0.5), FMT)
    direct = float((x @ wq.T - x @ w.T).pow(2).mean())
    assert A.quadratic_loss(wq, w, x.T @ x, x.shape[0]) == pytest.approx(direct, rel=1e-10)


def _naive_auto_clip(w, x, group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    """llm-awq ``auto_clip_layer`` transcribed (one output-channel batch, elementwise products)."""
    x = x.reshape(1, x.shape[0], -1, group_size)
    x = x[:, 0::max(1, x.shape[1] // n_sample_token)]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    org_max = w.abs().amax(dim=-1, keepdim=True)
    best, min_errs = org_max.clone(), torch.ones_like(org_max) * 1e9
    org_out = (x * w).sum(dim=-1)
    fmt = QuantFormat(bits=4, group_size=group_size)
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.clamp(w, -max_val, max_val)
        q = affine.fake_quantize(cur.reshape(w.shape[0], -1), fmt).reshape(cur.shape)
        err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better], best[better] = err[better], max_val[better]
    return best.squeeze(1).squeeze(-1)


@pytest.mark.parametrize("group_size,n_tok", [(16, 200), (64, 40)])  # Gram (g <= tokens) and direct paths
def test_clip_search_matches_llm_awq_and_never_hurts(group_size, n_tok):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    w[:, 5] *= 8  # weight outliers make clipping worthwhile
    x = torch.randn(n_tok, 64, generator=g, dtype=torch.float64) * torch.rand(64, generator=g, dtype=torch.float64) * 4
    fmt = QuantFormat(bits=4, group_size=group_size)
    m = A.search_clip(w, x, fmt, max_elems=2000)  # several output-channel batches
    assert torch.equal(m, _naive_auto_clip(w, x, group_size))
    assert (m < affine.group_view(w, fmt).abs().amax(-1)).any()  # some groups are actually clipped
    # the objective it minimises, computed directly: measured 105.0 -> 65.9 (g16, 90/160 groups clipped),
    # 293.9 -> 138.9 (g64, 36/40 groups clipped)
    assert A.clip_error(w, x, fmt, m) <= A.clip_error(w, x, fmt) * (1 + 1e-12)


def test_clip_sample_stride():
    assert A.sample_stride(8192, 512) == 16 and A.sample_stride(300, 512) == 1
    assert A.clip_candidates(20, 0.5) == [1 - i / 20 for i in range(10)]


# ---------------------------------------------------------------- the method on the tiny model
def test_awq_beats_rtn(awq_run, fp_logits, tmp_path):
    res, _, logits = awq_run
    model, _ = build_tiny_llama()
    RTNQuantizer(RTNConfig(format=FMT)).quantize(model, None, _ctx(tmp_path))
    mse_rtn = float((_logits(model) - fp_logits).pow(2).mean())
    mse_awq = float((logits - fp_logits).pow(2).mean())
    # measured: AWQ 0.138 vs RTN 0.320 (w4 g32, 8 x 64 random calibration tokens)
    assert mse_awq < 0.6 * mse_rtn
    assert len(res.quantized_layers) == 14 and res.summary["n_layers"] == 14


def test_gqa_skips_v_to_o_and_records_it(awq_run):
    res, orig, _ = awq_run
    assert [r["group"] for r in res.tables["awq_scales"]].count(VO) == 0
    assert len(res.tables["awq_scales"]) == 6 and res.summary["groups_searched"] == 6
    assert res.summary["groups_skipped"] == [VO]
    # o_proj is not scaled under GQA: its pre-clip weight is the original one; q_proj's is W diag(s)
    ref = res.reference_weights
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(ref[o], orig[o + ".weight"])
    s = res.artifacts["awq.scale.model.layers.0.input_layernorm->q_proj,k_proj,v_proj"]
    q = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(ref[q], orig[q + ".weight"] * s)
    for row in res.tables["awq_scales"]:
        assert row["loss_best"] <= row["loss_ratio0"]  # ratio 0 (identity) is a candidate
        assert 0 <= row["best_ratio"] < 1


def test_non_gqa_searches_v_to_o(tmp_path):
    model, _ = build_tiny_llama(num_key_value_heads=4)
    res = AWQQuantizer(AWQConfig(format=FMT)).quantize(model, _calib(), _ctx(tmp_path))
    assert [r["group"] for r in res.tables["awq_scales"]].count(VO) == 2
    assert res.summary["groups_skipped"] == [] and res.summary["groups_searched"] == 8
    assert "awq.scale.model.layers.1.self_attn.v_proj->o_proj" in res.artifacts


def test_artifact_keys_and_clip_skips_qk(awq_run):
    arts = awq_run[0].artifacts
    clips = sorted(k for k in arts if k.startswith("awq.clip."))
    assert len(clips) == 10  # 5 Linears per block (v, o, gate, up, down) x 2 blocks
    assert not any("q_proj" in k or "k_proj" in k for k in clips)
    assert arts["awq.clip.model.layers.0.mlp.down_proj"].shape == (64, 128 // 32)
    assert len([k for k in arts if k.startswith("awq.scale.")]) == 6


def test_duo_scaling_runs(tmp_path, fp_logits):
    model, _ = build_tiny_llama()
    res = AWQQuantizer(AWQConfig(format=FMT, duo_scaling=True)).quantize(model, _calib(), _ctx(tmp_path))
    assert res.summary["duo_scaling"] is True
    mse = float((_logits(model) - fp_logits).pow(2).mean())
    assert mse < 0.25  # measured 0.155 (RTN: 0.320)


def test_search_tokens_subsamples_whole_sequences(tmp_path, awq_run):
    assert search_sequences(32, 256, None) is None
    assert search_sequences(32, 256, 2048).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]
    assert search_sequences(4, 256, 10**6).tolist() == [0, 1, 2, 3]
    model, _ = build_tiny_llama()
    res = AWQQuantizer(AWQConfig(format=FMT, search_tokens=128)).quantize(model, _calib(), _ctx(tmp_path))
    assert res.summary["search_tokens"] == 128 and res.summary["calib_tokens"] == 512
    # eq. 4's loss is measured on 2 of the 8 sequences: other values (here the same chosen ratios)
    full = awq_run[0].tables["awq_scales"]
    assert all(a["loss_ratio0"] != b["loss_ratio0"] for a, b in zip(res.tables["awq_scales"], full))


def test_saved_artifacts_reproduce_the_model(awq_run, tmp_path):
    res, _, logits = awq_run
    path = save_artifacts(tmp_path / "artifacts.safetensors", res.artifacts, "awq", AWQConfig(format=FMT).to_dict())
    model, _ = build_tiny_llama()
    again = AWQQuantizer(AWQConfig(format=FMT, load_artifacts=str(tmp_path)))
    assert not again.needs_calibration()
    out = again.quantize(model, None, _ctx(tmp_path))
    assert out.summary["layers_clipped"] == 10 and out.summary["loaded_from"] == str(tmp_path)
    assert torch.equal(_logits(model), logits)
    with pytest.raises(ConfigError, match="quantizer.load_artifacts"):  # made for another model
        AWQQuantizer(AWQConfig(format=FMT, load_artifacts=str(path))).quantize(
            build_tiny_llama(num_hidden_layers=3)[0], None, _ctx(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("n_grid", 0), ("clip_n_grid", 1.5), ("clip_tokens", -1), ("duo_scaling", "yes"), ("clip", 1),
    ("clip_max_shrink", 1.0), ("clip_max_shrink", 0.01), ("search_tokens", 0), ("batch_size", 0),
])
def test_config_validation_names_the_key(field, value):
    with pytest.raises(ConfigError) as exc:
        AWQConfig(**{field: value})
    assert exc.value.key == f"quantizer.{field}"


def test_lm_head_cannot_be_selected():
    model, _ = build_tiny_llama()
    with pytest.raises(ConfigError) as exc:
        AWQQuantizer(AWQConfig(format=FMT, exclude=())).validate(model)
    assert exc.value.key == "quantizer.exclude"


# ---------------------------------------------------------------- variable-length calibration data


@pytest.mark.parametrize("search_tokens", [None, 128])
def test_equal_length_sequences_match_the_tensor_path(tmp_path, search_tokens):
    runs = []
    for calib in (_calib(), _as_sequences(_calib())):
        model, _ = build_tiny_llama()
        res = AWQQuantizer(AWQConfig(format=FMT, search_tokens=search_tokens, batch_size=3)).quantize(
            model, calib, _ctx(tmp_path))
        runs.append((model.state_dict(), res))
    (sd_t, res_t), (sd_l, res_l) = runs
    assert all(torch.equal(sd_t[k], sd_l[k]) for k in sd_t)
    assert all(torch.equal(res_t.artifacts[k], res_l.artifacts[k]) for k in res_t.artifacts)
    assert res_t.tables == res_l.tables
    assert res_t.summary["search_tokens"] == res_l.summary["search_tokens"] == (512 if search_tokens is None else 128)


def test_variable_length_data_and_search_tokens(tmp_path, fp_logits):
    lengths = [40, 17, 64, 40, 9, 33, 64, 25]
    calib = _varlen_calib(lengths)
    model, _ = build_tiny_llama()
    full = AWQQuantizer(AWQConfig(format=FMT)).quantize(model, calib, _ctx(tmp_path))
    assert full.summary["calib_tokens"] == full.summary["search_tokens"] == sum(lengths)
    assert float((_logits(model) - fp_logits).pow(2).mean()) < 0.25  # quantizes as well as on fixed rows
    # search_tokens picks whole sequences by position: ~120 / mean length (36.5) -> 3 of 8: 0, 2, 5
    assert search_sequences(8, sum(lengths) / 8, 120).tolist() == [0, 2, 5]
    part = AWQQuantizer(AWQConfig(format=FMT, search_tokens=120)).quantize(build_tiny_llama()[0], calib, _ctx(tmp_path))
    assert part.summary["search_tokens"] == 40 + 64 + 33 and part.summary["calib_tokens"] == sum(lengths)
    # every sequence selected == no selection
    m_all, _ = build_tiny_llama()
    every = AWQQuantizer(AWQConfig(format=FMT, search_tokens=10**6)).quantize(m_all, calib, _ctx(tmp_path))
    assert every.summary["search_tokens"] == sum(lengths)
    assert all(torch.equal(every.artifacts[k], full.artifacts[k]) for k in full.artifacts)


def test_search_batches_select_sequences_by_calibration_index():
    """With variable-length chunks (grouped by length), the kept rows are those whose set position is kept."""
    from quantlab.calib.sequential import BlockData

    hidden = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]
    index = [torch.tensor([1, 4]), torch.tensor([0, 2, 3])]
    cache = BlockCache(set(), {"m"}, set(), set(), 1, keep=torch.tensor([0, 3, 4]))
    cache.offsets(BlockData(hidden, [{}, {}], index))
    assert cache.n_tokens == 2 * 5 + 3 * 2
    got = [[x for x, _ in cache._search_batches(h, {}, c)] for c, h in enumerate(hidden)]
    assert torch.equal(torch.cat(got[0]), hidden[0][[1]]) and torch.equal(torch.cat(got[1]), hidden[1][[0, 2]])


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (v->o skipped) and v->o searched inside the attention stage
def test_one_stream_schedule_equals_cached_inputs(kv_heads, tmp_path, monkeypatch):
    """The one-stream schedule (block input stream, norm recomputed, fp stage outputs added in place) gives
    the same scales, clips and model as caching every inspected module's input and the block outputs."""
    import quantlab.quantizers.awq as awq_mod

    seen: list[int] = []
    capture = awq_mod.AWQQuantizer._capture

    def spy(self, b, *args):
        cache, outs = capture(self, b, *args)
        seen.append(len(cache.inputs) + len(outs))  # cached module inputs and output chunks
        return cache, outs

    monkeypatch.setattr(awq_mod.AWQQuantizer, "_capture", spy)
    one, _ = build_tiny_llama(num_key_value_heads=kv_heads)
    res1 = AWQQuantizer(AWQConfig(format=FMT)).quantize(one, _calib(), _ctx(tmp_path))
    assert res1.summary["one_stream_blocks"] == 2 and seen == [0, 0]
    monkeypatch.setattr(awq_mod, "stream_stages", lambda *_: None)
    two, _ = build_tiny_llama(num_key_value_heads=kv_heads)
    res2 = AWQQuantizer(AWQConfig(format=FMT)).quantize(two, _calib(), _ctx(tmp_path))
    assert res2.summary["one_stream_blocks"] == 0 and all(n > 0 for n in seen[2:])
    assert sorted(res1.artifacts) == sorted(res2.artifacts)
    assert all(torch.equal(res1.artifacts[k], res2.artifacts[k]) for k in res1.artifacts)
    assert res1.tables["awq_scales"] == res2.tables["awq_scales"]  # the same losses, to the bit
    assert torch.equal(_logits(one), _logits(two))


def test_stream_stages_only_when_every_stage_is_searched_in_order():
    mapping = get_mapping(build_tiny_llama()[0])
    attn, vo, mlp, down = mapping.groups
    stages = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}
    assert stream_stages(mapping, [attn, vo, mlp, down], None) == stages
    assert stream_stages(mapping, [attn, mlp, down], None) == stages
    assert stream_stages(mapping, [attn, mlp, down], torch.tensor([0])) is None  # search_tokens: a subset
    assert stream_stages(mapping, [attn, down], None) is None  # the MLP stage's group is not searched
    assert stream_stages(mapping, [mlp, attn, down], None) is None  # stages out of order
    assert stream_stages(mapping, [attn, down, mlp], None) is None  # down's fold would precede the MLP's fp outputs
