"""Quantizing a model whose weights stay on disk (``model.offload=disk``) gives, bit for bit, the
in-memory result: the same operations on the same values, one block read and written back at a time.

The offloaded model is the tiny Llama saved as safetensors and loaded through compressed-tensors'
offloading (``quantlab.models.offload``); the reference is the same model quantized in memory.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import cpu_ctx, random_calib, run_cli

from quantlab.calib.sequential import on_device
from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.models.loaders import ModelConfig, load_model
from quantlab.models.offload import check_offloadable, is_offloaded
from quantlab.quantizers.awq import AWQConfig
from quantlab.quantizers.base import build_quantizer
from quantlab.quantizers.gptq import GPTQConfig
from quantlab.quantizers.llm_qat import LLMQATConfig
from quantlab.quantizers.rtn import RTNConfig
from quantlab.quantizers.smoothquant_plus import SmoothQuantPlusConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FMT = QuantFormat(bits=4, group_size=32, zero_in_range=True)


def _load(tmp_path, offload: bool):
    cfg = ModelConfig(name="tiny", source="tiny", dtype="float32", device="cpu",
                      offload="disk" if offload else None, offload_folder=str(tmp_path / "off") if offload else None)
    return load_model(cfg)


def _weights(model):
    """Every parameter, read from wherever it lives (an offloaded one is read from disk)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


CASES = {
    "rtn": RTNConfig(format=FMT),
    "gptq": GPTQConfig(format=FMT, act_order=True),
    "awq": AWQConfig(format=FMT, n_grid=4),
    "smoothquant_plus": SmoothQuantPlusConfig(format=FMT, alpha_step=0.5),
}


@pytest.mark.parametrize("method", list(CASES))
def test_offloaded_quantization_equals_in_memory(tmp_path, method):
    calib = random_calib(4, 32) if method != "rtn" else None
    mem = _load(tmp_path, offload=False)
    off = _load(tmp_path, offload=True)
    assert is_offloaded(off.model) and not is_offloaded(mem.model)
    fp = _weights(mem.model)
    assert all(torch.equal(fp[n], w) for n, w in _weights(off.model).items())  # same checkpoint

    build_quantizer(CASES[method]).quantize(mem.model, calib, cpu_ctx(tmp_path / "m"))
    build_quantizer(CASES[method]).quantize(off.model, calib, cpu_ctx(tmp_path / "o"))

    q_mem, q_off = _weights(mem.model), _weights(off.model)
    assert q_mem.keys() == q_off.keys()
    changed = [n for n in q_mem if not torch.equal(q_mem[n], fp[n])]
    assert len(changed) >= 14  # every block Linear (tiny: 2 blocks x 7) was quantized in memory
    diff = [n for n in q_mem if not torch.equal(q_mem[n], q_off[n])]
    assert diff == []  # and reached the disk identically, norms (smoothing) included
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the offloaded model runs as it is (each module reads its weights from disk)
        assert torch.equal(mem.model(ids).logits, off.model(ids).logits)


def test_read_only_passes_write_nothing(tmp_path):
    off = _load(tmp_path, offload=True)
    block = off.model.model.layers[0]
    files = set(os.listdir(tmp_path / "off"))
    with on_device([block], torch.device("cpu"), writeback=False):
        block.mlp.up_proj.weight.data.mul_(2)  # changed on the materialized copy only
    assert set(os.listdir(tmp_path / "off")) == files
    fresh = _load(tmp_path / "again", offload=False).model
    assert torch.equal(block.mlp.up_proj.weight, fresh.model.layers[0].mlp.up_proj.weight)


def test_bad_offload_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.offload"):
        ModelConfig(name="t", source="tiny", offload="cpu")
    with pytest.raises(ConfigError, match="model.offload"):
        ModelConfig(name="t", source="tiny", offload="disk", device_map="balanced")
    with pytest.raises(ConfigError, match="model.offload"):
        check_offloadable(build_quantizer(LLMQATConfig()), needs_codes=False)
    with pytest.raises(ConfigError, match="quantizer.wakv"):
        check_offloadable(build_quantizer(RTNConfig(format=FMT, wakv="4-8-16")), needs_codes=False)
    with pytest.raises(ConfigError, match="deploy"):
        check_offloadable(build_quantizer(RTNConfig(format=FMT)), needs_codes=True)


@pytest.mark.slow
def test_cli_offloaded_run_matches_in_memory(tmp_path):
    """``python -m quantlab model.offload=disk`` records the perplexity of the in-memory run, exactly."""
    import json

    common = ["model=tiny_llama", "quantizer=gptq", "calib=random_8x64", "eval=[ppl_local]", "eval.ppl_local.max_windows=2"]
    ppl = {}
    for mode in ("null", "disk"):
        r = run_cli([*common, f"model.offload={mode}", f"experiment=off_{mode}"], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    for rec in (tmp_path / "results").rglob("result.json"):
        data = json.loads(rec.read_text())
        ppl[data["experiment"]] = next(v for k, v in data["metrics"].items() if k.startswith("ppl"))
    assert ppl["off_null"] == ppl["off_disk"]


def test_lm_eval_scores_an_offloaded_model_as_in_memory(tmp_path):
    """lm-eval's HFLM runs on the offloaded model (each module reads its weights from disk) with the
    in-memory scores, and the offloaded weights are never held all at once by quantlab's bookkeeping."""
    pytest.importorskip("lm_eval")
    from quantlab.evals.lm_eval_tasks import LmEvalTasks

    ev = LmEvalTasks(name="t", tasks=("quantlab_tiny_mc",), include_path="eval/lm_eval_tasks", limit=6,
                     bootstrap_iters=0)
    mem, off = _load(tmp_path, offload=False), _load(tmp_path, offload=True)
    a = ev.run(mem.model, mem.tokenizer, cpu_ctx(tmp_path / "m")).metrics
    b = ev.run(off.model, off.tokenizer, cpu_ctx(tmp_path / "o")).metrics
    assert a and a == b
    assert is_offloaded(off.model)


def test_placement_rules(tiny):
    """Blocks on the CPU are computed on the run's device; accelerate's CPU/disk offload next to GPUs is
    refused (the engine moves blocks itself: model.offload=disk is its way)."""
    from quantlab.models.loaders import _check_placement
    from quantlab.models.offload import execution_device

    model, _ = tiny
    block = model.model.layers[0]
    assert execution_device(block, torch.device("cuda")) == torch.device("cuda")  # CPU-held block, GPU compute
    model.hf_device_map = {"": "cpu"}
    _check_placement(model)  # everything on the CPU: fine
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu"}
    with pytest.raises(ConfigError, match="model.device_map"):
        _check_placement(model)


def test_generation_on_an_offloaded_model_equals_in_memory(tmp_path):
    from quantlab.generation import DecodingConfig, GenRequest, generate

    reqs = [GenRequest("def add(a, b):"), GenRequest("x = 1")]
    cfg = DecodingConfig(do_sample=True, top_k=20, max_new_tokens=12, n=2, batch_size=4, backend="hf", seed=3)
    mem, off = _load(tmp_path, offload=False), _load(tmp_path, offload=True)
    a, _ = generate(mem.model, mem.tokenizer, reqs, cfg)
    b, _ = generate(off.model, off.tokenizer, reqs, cfg)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert all(len(c.token_ids) > 0 for r in a for c in r)


def test_spilled_artifacts_stream_to_the_file_safetensors_would_write(tmp_path):
    """GPTQ's codes (a quarter of an fp32 model) are spilled to part files and streamed into
    artifacts.safetensors; the file reads back exactly as safetensors' own writer's (an independent
    reference) and the mapping never holds more than its budget."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quantlab.quantizers.artifacts import SpilledTensors, load_artifacts, save_artifacts

    g = torch.Generator().manual_seed(0)
    ref = {f"m.{i}.qweight": torch.randint(0, 16, (64, 96), generator=g, dtype=torch.uint8) for i in range(6)}
    ref.update({"m.0.scales": torch.rand(64, 3, generator=g), "m.0.g_idx": torch.arange(96, dtype=torch.int32),
                "alpha": torch.tensor(0.5, dtype=torch.float64), "m.0.bf": torch.rand(5, generator=g).bfloat16(),
                "m.0.flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4)})
    spill = SpilledTensors(tmp_path, flush_bytes=10_000)  # each qweight is 6144 bytes: flushes every 2
    for k, v in ref.items():
        spill[k] = v
        assert spill._bytes < 10_000
    assert len(spill) == len(ref) and set(spill) == set(ref) and len(set(spill._where.values())) >= 3
    assert all(torch.equal(spill[k], v) for k, v in ref.items())
    save_artifacts(tmp_path / "a.safetensors", spill, "gptq", {"bits": 4})
    save_file(ref, str(tmp_path / "b.safetensors"), metadata={"x": "y"})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "b.safetensors"), framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fb.keys():
            a, b = fa.get_tensor(k), fb.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    tensors, cfg = load_artifacts(tmp_path / "a.safetensors", "gptq")
    assert cfg == {"bits": 4} and torch.equal(tensors["m.3.qweight"], ref["m.3.qweight"])
    folder = spill._dir
    del spill
    import gc

    gc.collect()
    assert not folder.exists()  # the part files go with the mapping
