"""bitsandbytes quantizers (bnb_nf4 / nf4_dq / fp4 / fp4_dq / int8) on the tiny model, on CPU."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import compose

from quantlab.cli import build_spec, run
from quantlab.errors import ConfigError
from quantlab.experiment import execute
from quantlab.formats.nf4 import fake_quantize_codebook
from quantlab.formats.spec import QuantFormat
from quantlab.generation import DecodingConfig, GenRequest, generate
from quantlab.metrics.footprint import model_footprint
from quantlab.models.loaders import ModelConfig, load_model
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers.bnb import BnbConfig, BnbQuantizer
from quantlab.tracking.record import new_record
from quantlab.tracking.variant import make_variant

try:
    import bitsandbytes as bnb
except Exception:  # noqa: BLE001
    bnb = None
if bnb is None and os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1":  # CI installs the bnb extra
    raise RuntimeError("bitsandbytes is required in CI (make test installs the bnb extra)")
pytestmark = [pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed (pip install quantlab[bnb])"),
              pytest.mark.usefixtures("one_thread")]

TINY = ModelConfig(name="tiny_llama", source="tiny", dtype="float32", device="cpu")
MODES = ["bnb_nf4", "bnb_nf4_dq", "bnb_fp4", "bnb_fp4_dq", "bnb_int8"]


def _fmt(kind: str, dq: bool = False) -> QuantFormat:
    return QuantFormat(kind=kind, bits=4, group_size=64, symmetric=True, scale_bits=32, double_quant=dq)


def _load(cfg: BnbConfig):
    q = BnbQuantizer(cfg)
    q.prepare(torch.device("cpu"), torch.float32)
    loaded = load_model(TINY, q.load_config(torch.float32))
    q.validate(loaded.model)
    return q, loaded


@pytest.mark.parametrize("mode", MODES)
def test_bnb_presets_run_through_the_pipeline_and_generate(mode, tmp_path):
    cfg = compose(["+exp=demo_tiny", f"quantizer={mode}", "eval=[ppl_local]", "eval.ppl_local.max_windows=2"])
    rec = run(cfg, tmp_path)
    assert rec.status == "ok" and rec.quantizer["name"] == "bnb"
    assert rec.quant_summary["n_layers"] == 14  # 7 Linears x 2 blocks; lm_head excluded
    assert rec.quant_summary["bnb_mode"] == mode[4:].replace("_", "-")
    assert rec.metrics["ppl/local_stdlib"] > 1
    # the paper's bits per weight: 4 + 32/64, dq 4 + 8/64 + 32/(64*256), int8 8 + 32/in_features
    expect = {"bnb_nf4": 4.5, "bnb_fp4": 4.5, "bnb_nf4_dq": 4.127, "bnb_fp4_dq": 4.127}.get(mode)
    if expect is not None:
        assert rec.bits_per_weight == pytest.approx(expect, abs=1e-3)
        assert rec.quant_summary["compute_dtype"] == "bfloat16"  # the paper's (Roy section 2.2), on CPU too
    assert rec.quant_summary["method_label"] == "bnb." + mode[4:].replace("_", "-")

    spec = build_spec(cfg)
    q, loaded = _load(spec.quantizer)
    linear_type = bnb.nn.Linear8bitLt if mode == "bnb_int8" else bnb.nn.Linear4bit
    assert isinstance(loaded.model.model.layers[1].mlp.down_proj, linear_type)
    assert type(loaded.model.lm_head) is torch.nn.Linear
    dec = DecodingConfig(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=12, seed=3, backend="hf")
    (comps,), stats = generate(loaded.model, loaded.tokenizer, [GenRequest("def add(a, b):")], dec)
    assert comps[0].n_tokens >= 1 and stats.generated_tokens == comps[0].n_tokens


@pytest.mark.parametrize("kind,dq", [("nf4", False), ("fp4", False), ("nf4", True), ("fp4", True)])
def test_loaded_4bit_weights_equal_the_reference_codebook(kind, dq):
    """Dequantizing what bitsandbytes stored gives the reference fake-quant of the same fp weights:
    bit-exact without double quantization; with it, the tolerance measured in tests/test_nf4.py."""
    from bitsandbytes import functional as F

    ref, _ = build_tiny_llama()
    q, loaded = _load(BnbConfig(format=_fmt(kind, dq)))
    q.quantize(loaded.model, None, None)
    with torch.no_grad():  # a forward must not change the stored format (no CPU repack by default)
        loaded.model(torch.tensor([[1, 2, 3]]))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mod = loaded.model.get_submodule(name)
        got = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        w = ref.get_submodule(name).weight.detach()
        want = fake_quantize_codebook(w, kind, 64, double_quant=dq)
        if dq:  # absmax off by one 8-bit step in rare blocks (tests/test_nf4.py: max 0.0046 x max|w|)
            assert (got == want).float().mean() > 0.99
            assert (got - want).abs().max() <= 0.005 * w.abs().max()
        else:
            assert torch.equal(got, want), name


@pytest.mark.skipif(bnb is None or not bnb.nn.Linear4bit(8, 8).support_avx512bf16_for_cpu,
                    reason="the CPU has no AVX512-BF16: bitsandbytes never repacks here")
def test_opt_in_cpu_kernel_repacks_and_is_reported():
    """bitsandbytes' AVX512-BF16 kernel repacks at the first forward (bf16 absmax, double quantization
    undone); quantlab reports it and refuses to call the result the stored weights."""
    from quantlab.nn.swap import dense_weight

    q, loaded = _load(BnbConfig(format=_fmt("nf4", dq=True), cpu_bf16_kernel=True))
    res = q.quantize(loaded.model, None, None)
    assert res.summary["cpu_bf16_repack"] is True
    with torch.no_grad():
        loaded.model(torch.tensor([[1, 2, 3]]))
    mod = loaded.model.model.layers[0].self_attn.q_proj
    assert mod.weight.quant_state.absmax.dtype == torch.bfloat16 and not mod.weight.quant_state.nested
    with pytest.raises(ValueError, match="cpu_bf16_kernel=false"):
        dense_weight(mod)


def test_int8_weights_are_rowwise_absmax_int8():
    ref, _ = build_tiny_llama()
    _, loaded = _load(BnbConfig(format=QuantFormat(kind="int", bits=8, group_size=-1, symmetric=True, scale_bits=32)))
    mod = loaded.model.model.layers[0].mlp.up_proj
    w = ref.model.layers[0].mlp.up_proj.weight.detach()
    assert mod.weight.dtype == torch.int8
    # bitsandbytes casts to fp16 before quantizing: scale = absmax/127 of the fp16 row
    w16 = w.half().float()
    scale = w16.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(mod.weight.SCB.float(), w16.abs().amax(1), rtol=0, atol=0)
    deq = mod.weight.float() * scale
    assert (deq - w16).abs().max() <= 0.5 * scale.max() + 1e-7


def test_footprint_counts_the_quantization_state_exactly():
    """Packed codes (2 per byte), an fp32 absmax per 64 and each layer's 16-entry code book; with
    double quantization uint8 absmax + an fp32 per 256 blocks, an fp32 offset and a 256-entry map."""
    fp = model_footprint(build_tiny_llama()[0])
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    n_w = sum(o * i for o, i in shapes)
    blocks = [o * i // 64 for o, i in shapes]
    _, plain = _load(BnbConfig(format=_fmt("nf4")))
    f = model_footprint(plain.model)
    assert f.params == fp.params - 4 * n_w + n_w // 2
    assert f.quant_state == 4 * sum(blocks) + 16 * 4 * len(shapes)
    assert f.hf == f.params + f.buffers  # transformers' get_memory_footprint misses the states
    _, dq = _load(BnbConfig(format=_fmt("nf4", dq=True)))
    g = model_footprint(dq.model)
    nested = sum(-(-b // 256) for b in blocks)
    assert g.quant_state == sum(blocks) + 4 * nested + len(shapes) * (16 * 4 + 4 + 256 * 4)


def test_double_quantization_shrinks_a_wide_model():
    """At a realistic width the 8-bit absmax wins (the paper's nf4-dq < nf4 < int8 < fp16 order)."""
    wide = ModelConfig(name="wide", source="tiny", dtype="float32", device="cpu",
                       tiny=dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                 num_key_value_heads=4, outlier_channels=(3,)))
    sizes = {"fp": model_footprint(load_model(wide).model).total}
    for name, fmt in [("nf4", _fmt("nf4")), ("nf4-dq", _fmt("nf4", True)),
                      ("int8", QuantFormat(kind="int", bits=8, group_size=-1, symmetric=True, scale_bits=32))]:
        q = BnbQuantizer(BnbConfig(format=fmt))
        sizes[name] = model_footprint(load_model(wide, q.load_config(torch.float32)).model).total
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["int8"] < sizes["fp"]


ROY_PRESETS = [f"ptq_sampling_{m}" for m in ("llama2_7b", "llama2_13b", "llama2_70b", "falcon_7b", "falcon_40b",
                                               "redpajama_3b", "stablelm_3b", "smollm2")]


@pytest.mark.parametrize("preset", ROY_PRESETS)
def test_roy_presets_compute_the_4bit_modes_in_bfloat16(preset):
    """Roy's paper computes nf4/fp4 in bfloat16 (section 2.2): every 4-bit mode of the study composes
    with it, int8 keeps no compute dtype, and the variant records it; the model dtype instead is a
    different variant and a different label."""
    for mode in MODES:
        spec = build_spec(compose([f"+exp={preset}", f"quantizer={mode}"]))
        label = BnbQuantizer(spec.quantizer).label(spec.model.dtype)
        stored = make_variant(spec)["settings"]["quantizer"]["config"]["compute_dtype"]
        assert label == "bnb." + mode[4:].replace("_", "-")
        if mode == "bnb_int8":
            assert spec.quantizer.compute_dtype is None and stored is None
            continue
        assert spec.quantizer.compute_dtype == "bfloat16" and stored == "bfloat16"
        model_dtype = build_spec(compose([f"+exp={preset}", f"quantizer={mode}", "quantizer.compute_dtype=null"]))
        short = {"float16": "fp16", "float32": "fp32"}[spec.model.dtype]
        assert BnbQuantizer(model_dtype.quantizer).label(spec.model.dtype) == f"{label} compute:{short}"
        assert make_variant(model_dtype)["id"] != make_variant(spec)["id"]


def test_bad_configs_name_their_key():
    with pytest.raises(ConfigError, match="quantizer.exclude"):
        BnbConfig(exclude=("*.lm_head",))
    with pytest.raises(ConfigError, match="quantizer.include"):
        BnbConfig(include=("model.layers.0.*",))
    with pytest.raises(ConfigError, match="quantizer.format.group_size"):
        BnbConfig(format=QuantFormat(kind="nf4", bits=4, group_size=128, symmetric=True, scale_bits=32))
    with pytest.raises(ConfigError, match="quantizer.format"):
        BnbConfig(format=QuantFormat(bits=4, group_size=64))
    with pytest.raises(ConfigError, match="quantizer.compute_dtype"):
        BnbConfig(compute_dtype="int8")


def test_unsupported_device_fails_before_loading(monkeypatch, tmp_path):
    def broken(self, x):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", broken)
    spec = build_spec(compose(["+exp=demo_tiny", "quantizer=bnb_nf4", "eval=[ppl_local]"]))
    loads = []
    monkeypatch.setattr("quantlab.experiment.load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(ConfigError, match=r"cannot run nf4 on cpu: NotImplementedError: no kernel"):
        execute(spec, tmp_path, new_record(tmp_path))
    assert loads == []


def test_missing_bitsandbytes_is_a_config_error(monkeypatch):
    monkeypatch.setattr("quantlab.quantizers.bnb.bnb_version", lambda: None)
    with pytest.raises(ConfigError, match=r"pip install 'quantlab\[bnb\]'"):
        BnbQuantizer(BnbConfig()).prepare(torch.device("cpu"), torch.float32)


def test_layer_diagnostics_compare_bnb_layers_with_a_separate_fp_load(tmp_path):
    """layer_error on bnb_nf4 (fp reference from a second, unquantized load; bnb weights dequantized)
    equals layer_error on nf4_ref, the bit-exact fake quantization of the same codebook."""
    errs = {}
    for q in ("bnb_nf4", "nf4_ref"):
        spec = build_spec(compose(["+exp=demo_tiny", f"quantizer={q}", "eval=[layer_error]"]))
        extras = execute(spec, tmp_path / q, new_record(tmp_path / q))
        errs[q] = {r["layer"]: r["rel_weight_error"] for r in extras.tables["layer_diagnostics"]}
    assert len(errs["bnb_nf4"]) == 14 and errs["bnb_nf4"].keys() == errs["nf4_ref"].keys()
    for name, e in errs["nf4_ref"].items():
        assert errs["bnb_nf4"][name] == pytest.approx(e, rel=1e-6), name
