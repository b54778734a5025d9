"""The calibration memory budget (calib.budget) and the lockstep forward (calib.lockstep) that keeps
true-sequential GPTQ at one forward per chunk when the calibration set is cut into chunks."""
from __future__ import annotations

import pytest
import torch
from conftest import cpu_ctx as _ctx
from conftest import random_calib as _calib
from torch import nn
from transformers import LlamaConfig

from quantlab.algorithms.gptq import HessianAccumulator, gptq_quantize_weight
from quantlab.calib.budget import activation_bytes_per_token, chunk_tokens, model_bytes, streams_that_fit
from quantlab.calib.lockstep import LockstepError, lockstep_forward
from quantlab.calib.sequential import BlockContext, BlockData, model_plan, run_sequential
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers.gptq import GPTQConfig, GPTQQuantizer, _block_subsets

F64 = torch.float64
FMT = QuantFormat(bits=4, group_size=32, zero_in_range=True)


def _smollm2_shaped():
    """SmolLM2-135M's shapes (hidden 576, MLP 1536, 30 layers, vocab 49152, tied), on the meta device."""
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM(cfg)


def test_budget_of_smollm2_shapes():
    model = _smollm2_shaped()
    n_params = 134_515_008  # SmolLM2-135M: 30 x 3.54M decoder params + 28.3M tied embeddings + norms
    assert model_bytes(model) == 4 * (n_params + 64)  # + rotary inv_freq and original_inv_freq (head_dim / 2 floats each)
    # 6 x 576 + 3 x 1536 fp32 values per token
    assert activation_bytes_per_token(model.config, 256, torch.float32) == 4 * (6 * 576 + 3 * 1536)
    expected = int(4 * (n_params + 64) / 16 // (4 * (6 * 576 + 3 * 1536)))  # 1042
    assert chunk_tokens(model, 256) == expected
    plan = model_plan(model, torch.zeros(32, 256, dtype=torch.int64))
    assert [c.tokens.shape[0] for c in plan] == [4] * 8  # 4 sequences of 256 per forward
    # an explicit batch_size wins; one sequence longer than the budget is a chunk of its own
    assert [c.tokens.shape[0] for c in model_plan(model, torch.zeros(32, 256, dtype=torch.int64), 32)] == [32]
    assert [c.tokens.shape[0] for c in model_plan(model, torch.zeros(2, 4096, dtype=torch.int64))] == [1, 1]
    # SmoothQuant+'s candidate streams: 18.9 MB each at 32 x 256 x 576 fp32 -> one per wave
    assert streams_that_fit(model, 32 * 256 * 576 * 4) == 1


def test_tiny_models_keep_one_chunk():
    model, _ = build_tiny_llama()
    assert model_bytes(model) * 16 < 32 * 2**20  # below the floor: the 32 MiB floor decides
    assert len(model_plan(model, _calib().tokens)) == 1


def _multipass_reference(model, calib, fmt):
    """True-sequential GPTQ written independently: per block, per subset, one pass over every chunk
    (each with the subsets before it already quantized) for its Hessian, then the block's outputs."""
    mapping = get_mapping(model)
    targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}

    def per_block(b: BlockContext):
        for names in _block_subsets(mapping, b.name, targets):
            acc = HessianAccumulator(b.module(names[0]).in_features)
            b.collect([names[0]], lambda _n, x, _kw, _c: acc.add(x), early_exit=True)
            W = torch.cat([b.module(n).weight.data for n in names])
            res = gptq_quantize_weight(W, acc.H, fmt)
            r0 = 0
            for n in names:
                m = b.module(n)
                m.weight.data.copy_(res.weight[r0:r0 + m.out_features])
                r0 += m.out_features
        return None

    run_sequential(model, mapping, calib.tokens, per_block, device=torch.device("cpu"), batch_size=3)


def test_lockstep_gptq_equals_the_multipass_schedule(tmp_path):
    calib = _calib()
    ref, _ = build_tiny_llama(dtype=F64)
    _multipass_reference(ref, calib, FMT)
    model, _ = build_tiny_llama(dtype=F64)
    GPTQQuantizer(GPTQConfig(format=FMT, batch_size=3)).quantize(model, calib, _ctx(tmp_path))
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)  # bit for bit: same Hessians, same order


class _Branchy(nn.Module):
    """A block whose path depends on the batch size (to break lockstep on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.a(h) if h.shape[0] == 1 else self.b(h)


def _ctx_of(block: nn.Module, hidden: list[torch.Tensor]) -> BlockContext:
    data = BlockData(hidden=hidden, kwargs=[{} for _ in hidden], index=[torch.arange(1) for _ in hidden])
    return BlockContext(0, "blk", block, data, None, torch.device("cpu"))  # type: ignore[arg-type]


def test_lockstep_order_and_outputs():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    hidden = [torch.randn(2, 3, 4) for _ in range(3)]
    events = []
    outs = lockstep_forward(_ctx_of(seq, hidden), [["0"], ["2"]],
                            lambda n, x, kw, c: events.append((n, c)), lambda n: events.append((n, "barrier")))
    # every chunk reaches a barrier before it opens, in chunk order
    assert events == [("0", 0), ("0", 1), ("0", 2), ("0", "barrier"), ("2", 0), ("2", 1), ("2", 2), ("2", "barrier")]
    with torch.no_grad():
        assert all(torch.equal(o, seq(h)) for o, h in zip(outs, hidden))


def test_lockstep_refuses_chunks_that_diverge_and_cleans_up():
    blk = _Branchy()
    with pytest.raises(LockstepError, match="different paths"):
        lockstep_forward(_ctx_of(blk, [torch.randn(1, 2, 4), torch.randn(2, 2, 4)]), [["a"], ["b"]],
                         lambda *a: None, lambda n: None)
    assert not blk.a._forward_pre_hooks and not blk.b._forward_pre_hooks

    def boom(_n):
        raise ValueError("barrier failed")

    with pytest.raises(ValueError, match="barrier failed"):
        lockstep_forward(_ctx_of(blk, [torch.randn(2, 2, 4)] * 2), [["b"]], lambda *a: None, boom)
    assert not blk.b._forward_pre_hooks
