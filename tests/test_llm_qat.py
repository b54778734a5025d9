"""quantizer=llm_qat end to end on the tiny model, and W-A-KV as a PTQ post-step (issue 6)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import random_calib

from quantlab import wakv_step
from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.generation import DecodingConfig, GenRequest, generate
from quantlab.nn.qat import QATLinear, kv_linear_names, sym_minmax_fake_quant
from quantlab.quantizers.base import build_quantizer
from quantlab.quantizers.bnb import BnbConfig
from quantlab.quantizers.llm_qat import LLMQATConfig
from quantlab.quantizers.none import NoneConfig
from quantlab.quantizers.rtn import RTNConfig
from quantlab.quantizers.smoothquant import SmoothQuantConfig
from quantlab.types import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"data": {"n_sequences": 12, "max_length": 24, "batch_size": 6},
         "train": {"steps": 12, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "checkpoint_every": 4}}


def _ctx(tmp_path, fp="run-a", tok=None):
    return RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path / "out", tokenizer=tok,
                      run_fingerprint=fp)


# ------------------------------------------------------------------------------------ config


def test_llm_qat_config_derives_the_per_channel_format_and_names_bad_keys():
    assert LLMQATConfig(**SMALL).format == QuantFormat(bits=4, group_size=-1, symmetric=True)
    assert LLMQATConfig(wakv="8-8-8").format.bits == 8
    assert LLMQATConfig(wakv="16-8-8").format is None  # activations / KV only
    with pytest.raises(ConfigError, match=r"quantizer\.data\.nope"):
        LLMQATConfig(data={"nope": 1})
    with pytest.raises(ConfigError, match=r"quantizer\.train\.steps"):
        LLMQATConfig(train={"steps": 0})
    with pytest.raises(ConfigError, match=r"quantizer\.format"):
        LLMQATConfig(format={"bits": 4, "group_size": 128, "symmetric": True})
    with pytest.raises(ConfigError, match=r"quantizer\.a_quant"):
        LLMQATConfig(a_quant="pact")
    with pytest.raises(ConfigError, match=r"quantizer\.wakv"):
        LLMQATConfig(wakv="4-8")


def test_llm_qat_label_names_teacher_sampling_that_is_not_the_reference():
    """top_k 50 (the code's HF default) is the reference and unlabelled; the full softmax is labelled,
    except for all-greedy data, where nothing is sampled."""
    def label(**data):
        return build_quantizer(LLMQATConfig(data=data)).label("float32")

    assert label() == "llm_qat w4pcs 4-8-4"
    assert label(top_k=0) == "llm_qat w4pcs 4-8-4 data.top_k:0"
    assert label(top_k=20, strategy="sample") == "llm_qat w4pcs 4-8-4 data.top_k:20"
    assert label(top_k=0, strategy="greedy") == "llm_qat w4pcs 4-8-4"


def test_wakv_never_changes_the_format_and_is_refused_where_it_cannot_apply(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match=r"quantizer\.wakv: W=8 bits, but quantizer\.format\.bits=4"):
        RTNConfig(format=QuantFormat(bits=4, group_size=64), wakv="8-8-8")  # an explicit format is never overwritten
    assert RTNConfig(format=QuantFormat(bits=8, group_size=64), wakv="8-8-8").format == QuantFormat(bits=8, group_size=64)
    with pytest.raises(ConfigError, match=r"quantizer\.wakv: W=4 bits, but quantizer\.format\.bits=8"):
        SmoothQuantConfig(wakv="4-8-4")  # W8A8's own int8 format
    w4pc = QuantFormat(bits=4, group_size=-1, symmetric=True)
    assert SmoothQuantConfig(format=w4pc, wakv="4-8-4").format == w4pc
    with pytest.raises(ConfigError, match=r"quantizer\.wakv.*nf4"):
        RTNConfig(format=QuantFormat(kind="nf4", bits=4, group_size=64, symmetric=True), wakv="8-8-8")
    with pytest.raises(ConfigError, match="W must be 16"):
        wakv_step.check(build_quantizer(NoneConfig(wakv="4-8-4")), model)
    with pytest.raises(ConfigError, match="quantizer=none"):
        wakv_step.check(build_quantizer(RTNConfig(format=QuantFormat(group_size=-1), wakv="16-8-8")), model)
    with pytest.raises(ConfigError, match=r"quantizer\.wakv.*not nn.Linear"):
        BnbConfig(format=QuantFormat(kind="nf4", bits=4, group_size=64, symmetric=True, scale_bits=32), wakv="4-8-4")
    q = build_quantizer(RTNConfig(format=w4pc, wakv="4-8-4"))
    assert q.label("float32") == "rtn w4pcs 4-8-4"
    assert str(wakv_step.setting_of(build_quantizer(SmoothQuantConfig()))) == "8-8-16"  # plain W8A8 in the tables


def test_presets_tie_the_weight_bits_to_w_explicitly():
    """The LLM-QAT presets sweep W-A-KV over W=4 and W=8: their format says ``bits: ${wakv_w:...}``."""
    from conftest import compose

    from quantlab.cli import build_spec

    for wakv, bits in (("8-8-4", 8), ("4-8-8", 4)):
        for q in ("rtn", "smoothquant", "gptq", "llm_qat_paper"):
            spec = build_spec(compose(["+exp=llmqat_llama_7b", f"quantizer={q}", f"quantizer.wakv={wakv}"]))
            assert spec.quantizer.format.bits == bits, (q, wakv)
    with pytest.raises(ConfigError, match="quantizer.wakv"):
        build_spec(compose(["+exp=llmqat_llama_7b", "quantizer=rtn", "quantizer.wakv=8-8-4",
                            "quantizer.format.bits=4"]))


# ------------------------------------------------------------------------------------ PTQ + W-A-KV


def test_rtn_with_wakv_keeps_rtn_weights_and_adds_per_token_activation_and_kv_quant(tiny, tmp_path):
    model, _ = tiny
    fmt = QuantFormat(bits=4, group_size=-1, symmetric=True)
    plain = wakv_step.quantize(build_quantizer(RTNConfig(format=fmt)), _fresh(), None, _ctx(tmp_path)).model
    res = wakv_step.quantize(build_quantizer(RTNConfig(format=fmt, wakv="4-8-4")), model, None, _ctx(tmp_path))
    assert res.summary["wakv"] == "4-8-4" and res.summary["wakv_swapped"] == 14
    for name, mod in plain.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q = model.get_submodule(name)
            assert isinstance(q, QATLinear) and torch.equal(q.quantized_weight(), mod.weight)  # RTN's weights
            assert (q.spec.w_bits, q.spec.a_bits, q.spec.out_bits) == (16, 8, 4 if name.endswith(("k_proj", "v_proj")) else 16)
    # the forward of one KV Linear, written out: per-token A8 input, RTN weight, per-token KV4 output
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    x = torch.randn(2, 7, k.in_features)
    want = sym_minmax_fake_quant(torch.nn.functional.linear(sym_minmax_fake_quant(x, 8), k.weight), 4)
    torch.testing.assert_close(k(x), want, rtol=0, atol=1e-6)


def _fresh():
    from quantlab.models.tiny import build_tiny_llama

    return build_tiny_llama()[0]


def test_smoothquant_with_wakv_uses_the_shared_activation_quantizer(tmp_path):
    model = _fresh()
    cfg = SmoothQuantConfig(format=QuantFormat(bits=4, group_size=-1, symmetric=True), wakv="4-6-16")
    res = wakv_step.quantize(build_quantizer(cfg), model, random_calib(), _ctx(tmp_path))
    mods = [m for n, m in model.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)]
    assert not any(isinstance(m, QATLinear) and m.spec.arith == "smoothquant" for m in mods)  # not SmoothQuant's A8
    assert all(isinstance(m, QATLinear) and m.spec.a_bits == 6 and m.spec.out_bits == 16 for m in mods)
    assert res.summary["act_bits"] == 6 and res.summary["weight_format"] == "w4pcs"


def test_kv_quantization_is_active_during_cached_generation(tiny, tmp_path):
    model, tok = tiny
    wakv_step.quantize(build_quantizer(RTNConfig(format=QuantFormat(bits=4, group_size=-1, symmetric=True), wakv="4-8-4")),
        model, None, _ctx(tmp_path))
    seen: list[torch.Tensor] = []
    k = model.get_submodule("model.layers.1.self_attn.k_proj")
    hook = k.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    prompt = (5, 17, 99, 3)
    comps, _ = generate(model, tok, [GenRequest("p", prompt_ids=prompt)],
                        DecodingConfig(do_sample=False, max_new_tokens=10, backend="hf", batch_size=1))
    hook.remove()
    got = list(comps[0][0].token_ids)
    assert len(seen) >= 10 and seen[-1].shape[-2] == 1  # decode steps run one token at a time (KV cache)
    for out in seen:  # every cached key row is on its own 4-bit per-token grid
        torch.testing.assert_close(out, sym_minmax_fake_quant(out, 4), rtol=0, atol=1e-6)
    ids = list(prompt)  # the same greedy tokens when every step recomputes the whole sequence (no cache)
    with torch.no_grad():
        for _ in range(len(got)):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(prompt):] == got


# ------------------------------------------------------------------------------------ LLM-QAT


def test_llm_qat_trains_a_fake_quant_student_and_reuses_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    model, tok = tiny
    cfg = LLMQATConfig(**SMALL)
    res = wakv_step.quantize(build_quantizer(cfg), model, None, _ctx(tmp_path, tok=tok))
    s = res.summary
    assert s["wakv"] == "4-8-4" and s["steps_done"] == 12 and s["data_sequences"] == 12
    assert s["loss_last"] < s["loss_first"]  # measured 5.2002 -> 5.1178 (lr 1e-3, 12 steps, data top_k 50)
    assert len(res.tables["qat_loss_curve"]) == 12 and (tmp_path / "out" / "qat_loss.png").is_file()
    targets = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    assert len(targets) == 14 and set(res.quantized_layers) == set(targets)
    kv = kv_linear_names(model)
    assert all(model.get_submodule(n).spec.out_bits == (4 if n in kv else 16) for n in targets)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(ids).logits
    # the same run again reuses the finished student (and the generated data) instead of training
    again = wakv_step.quantize(build_quantizer(cfg), _fresh(), None, _ctx(tmp_path, tok=tok))
    assert "reused_student" in again.summary and again.summary["data_wall_s"] < 5
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, trained, rtol=0, atol=0)
    # and load_student re-applies it anywhere
    loaded = wakv_step.quantize(build_quantizer(dataclasses.replace(cfg, load_student=s["student_file"])),
        _fresh(), None, _ctx(tmp_path, fp=None, tok=tok))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained, rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"quantizer\.load_student"):
        wakv_step.quantize(build_quantizer(dataclasses.replace(cfg, load_student=str(tmp_path / "nope"))),
            _fresh(), None, _ctx(tmp_path, fp=None, tok=tok))


def test_llm_qat_clipping_variants_train(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    model, tok = tiny
    cfg = LLMQATConfig(**SMALL, w_quant="statsq", a_quant="lsq", wakv="4-8-16")
    res = wakv_step.quantize(build_quantizer(cfg), model, None, _ctx(tmp_path, tok=tok))
    assert build_quantizer(cfg).label("float32") == "llm_qat w4pcs 4-8-16 w:statsq a:lsq"
    q = model.get_submodule("model.layers.0.mlp.down_proj")
    assert q.spec.w_quant == "statsq" and q.spec.a_quant == "lsq" and bool(q.act_step_ready)
    assert res.summary["loss_last"] < res.summary["loss_first"]  # measured 5.3189 -> 5.2614 (data top_k 50)
