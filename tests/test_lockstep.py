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


def _block0(model, calib, batch_size, mapping):
    from quantlab.calib.sequential import capture_block_inputs

    data = capture_block_inputs(model, mapping, calib.tokens, device=torch.device("cpu"), batch_size=batch_size)
    return BlockContext(0, "model.layers.0", mapping.blocks(model)[0], data, mapping, torch.device("cpu"))


def _halve_at_barriers(ctx, seen):
    subsets = [list(s) for s in ctx.mapping.sequential]

    def on_barrier(name):  # a change the later barriers and the outputs must see
        seen.append((name, [h.numel() for h in ctx.inputs.hidden]))
        for n in subsets[[s[0] for s in subsets].index(name)]:
            ctx.module(n).weight.data.mul_(0.5)

    return lockstep_forward(ctx, subsets, lambda *a: None, on_barrier, release_inputs=True)


def test_the_tail_ends_chunks_at_down_proj_and_gives_the_same_outputs():
    """With the mapping's residual + outputs, chunks 1.. end their forward at down_proj (their inputs are
    freed before the barrier opens) and their outputs are residual + down_proj(x): bit for bit the
    outputs of the plain lockstep (a mapping without ``outputs``) and of a plain forward."""
    import dataclasses

    from quantlab.calib.lockstep import residual_tail

    calib = _calib(n=8, t=16)
    mapping = get_mapping(build_tiny_llama()[0])
    plain_mapping = dataclasses.replace(mapping, outputs=())
    assert residual_tail(mapping, mapping.sequential) == ("post_attention_layernorm", "mlp.down_proj")
    assert residual_tail(plain_mapping, mapping.sequential) is None
    assert residual_tail(mapping, mapping.sequential[:3]) is None  # down_proj is not a barrier
    results = {}
    for label, mp in (("tail", mapping), ("plain", plain_mapping)):
        model, _ = build_tiny_llama(dtype=F64)
        ctx = _block0(model, calib, 3, mp)  # chunks of 3, 3, 2 sequences
        n = [h.numel() for h in ctx.inputs.hidden]
        seen: list = []
        outs = _halve_at_barriers(ctx, seen)
        with torch.no_grad():
            fresh = _block0(model, calib, 3, mp)  # block 0's weights are all halved now
            ref = fresh.forward()
        assert all(torch.equal(o, r) for o, r in zip(outs, ref))
        results[label] = (outs, seen, n)
    (outs, seen, n), (plain_outs, plain_seen, _) = results["tail"], results["plain"]
    assert all(torch.equal(a, b) for a, b in zip(outs, plain_outs))
    assert seen[-1] == ("mlp.down_proj", [n[0], 0, 0])  # chunks 1 and 2 ended, their inputs freed
    assert plain_seen[-1] == ("mlp.down_proj", n)


def test_a_mapping_that_does_not_describe_the_block_is_caught():
    import dataclasses

    calib = _calib(n=4, t=16)
    model, _ = build_tiny_llama(dtype=F64)
    mapping = get_mapping(model)
    wrong = dataclasses.replace(mapping, residual=(("post_attention_layernorm", "self_attn"), ("input_layernorm", "mlp")))
    ctx = _block0(model, calib, 2, wrong)  # the kept "residual" is the block's input, not the mid-block one
    with pytest.raises(LockstepError, match="not input_layernorm's input"):
        _halve_at_barriers(ctx, [])
