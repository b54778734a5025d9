"""The shared calibration engine: block-by-block passes, input capture, statistics, mappings."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from quantlab.calib.budget import MAX_CHUNK_TOKENS
from quantlab.calib.sequential import (
    BlockContext,
    auto_batch_size,
    capture_block_inputs,
    check_finite,
    first_sequences,
    plan_chunks,
    run_sequential,
)
from quantlab.calib.stats import collect_group_absmax, group_key
from quantlab.errors import ConfigError, DataError
from quantlab.models.mappings import ARCH_MAPPINGS, get_mapping
from quantlab.models.tiny import build_tiny_llama

CPU = torch.device("cpu")


@pytest.fixture
def tiny64():
    model, _ = build_tiny_llama(dtype=torch.float64)
    return model


def _tokens(n=5, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_block_by_block_equals_full_forward(tiny64, batch_size):
    """Identity callback: the last block's outputs (after the final norm) are the model's hidden states."""
    x = _tokens()
    outs = []

    def fn(ctx: BlockContext) -> None:
        if ctx.index == len(ctx.mapping.blocks(tiny64)) - 1:
            outs.extend(ctx.forward())

    run_sequential(tiny64, get_mapping(tiny64), x, fn, device=CPU, batch_size=batch_size)
    with torch.no_grad():
        ref = tiny64.model(x).last_hidden_state
    assert torch.equal(tiny64.model.norm(torch.cat(outs)), ref)


def test_capture_matches_embeddings_and_drops_cache(tiny64):
    x = _tokens()
    data = capture_block_inputs(tiny64, get_mapping(tiny64), x, device=CPU, batch_size=2)
    assert [h.shape[0] for h in data.hidden] == [2, 2, 1]
    assert torch.equal(torch.cat(data.hidden), tiny64.model.embed_tokens(x).detach())
    assert data.n_tokens == 5 * 24
    for kw in data.kwargs:
        assert kw["use_cache"] is False and "past_key_values" not in kw
        assert "position_embeddings" in kw


def test_propagate_fp_vs_quantized(tiny64):
    """'fp' feeds the next block the untouched block's outputs; 'quantized' the modified block's."""
    x = _tokens(3, 16)
    with torch.no_grad():
        fp_hidden = tiny64.model(x, output_hidden_states=True).hidden_states  # [emb, block0 out, ...]
    for propagate in ("fp", "quantized"):
        model, _ = build_tiny_llama(dtype=torch.float64)
        seen = {}

        def fn(ctx: BlockContext, seen=seen) -> None:
            seen[ctx.index] = torch.cat(ctx.inputs.hidden)
            ctx.module("mlp.down_proj").weight.data.mul_(0.5)  # stand-in for quantization

        run_sequential(model, get_mapping(model), x, fn, device=CPU, propagate=propagate)
        same = torch.allclose(seen[1], fp_hidden[1], rtol=0, atol=1e-12)
        assert same == (propagate == "fp")


def test_collect_early_exit_skips_later_modules(tiny64):
    calls = {"mlp": 0, "q": 0}
    tiny64.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))

    def fn(ctx: BlockContext) -> None:
        if ctx.index == 0:
            def on_input(name, x, kw, chunk):
                calls["q"] += 1
                assert x.shape[-1] == 64

            ctx.collect(["self_attn.q_proj"], on_input, early_exit=True)

    run_sequential(tiny64, get_mapping(tiny64), _tokens(4, 8), fn, device=CPU, batch_size=2, propagate="fp")
    # fp propagation runs block 0 once per chunk (2 chunks); the early-exit collect never reaches the MLP
    assert calls == {"mlp": 2, "q": 2}


def test_collect_gives_module_kwargs(tiny64):
    got = {}

    def fn(ctx: BlockContext) -> None:
        if ctx.index == 0:
            ctx.collect(["self_attn"], lambda n, x, kw, c: got.update(kw), early_exit=True)

    run_sequential(tiny64, get_mapping(tiny64), _tokens(2, 8), fn, device=CPU)
    assert "position_embeddings" in got  # attention needs the rotary embeddings to be re-run


def test_collect_unknown_module_raises(tiny64):
    def fn(ctx: BlockContext) -> None:
        ctx.collect(["mlp.nope"], lambda *a: None)

    with pytest.raises(AttributeError):
        run_sequential(tiny64, get_mapping(tiny64), _tokens(2, 8), fn, device=CPU)


def test_nan_embeddings_clear_error(tiny64):
    x = _tokens(2, 8)
    tiny64.model.embed_tokens.weight.data[int(x[0, 0])] = float("nan")
    with pytest.raises(DataError, match="embeddings"):
        run_sequential(tiny64, get_mapping(tiny64), x, lambda ctx: None, device=CPU)


def test_inf_inside_block_names_the_block(tiny64):
    tiny64.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(DataError, match=r"model\.layers\.1"):
        run_sequential(tiny64, get_mapping(tiny64), _tokens(2, 8), lambda ctx: None, device=CPU)


def test_unknown_architecture_fails_loudly():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as e:
        get_mapping(model)
    assert "LlamaForCausalLM" in str(e.value)  # lists the known ones
    assert e.value.key == "model"


def test_mistral_uses_the_llama_layout():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = MistralForCausalLM(cfg).double().eval()
    mapping = get_mapping(model)
    assert mapping is ARCH_MAPPINGS["LlamaForCausalLM"]
    x = torch.randint(0, 64, (2, 12))
    outs = []
    run_sequential(model, mapping, x, lambda ctx: outs.extend(ctx.forward()) if ctx.index == 1 else None, device=CPU)
    with torch.no_grad():
        assert torch.equal(model.model.norm(torch.cat(outs)), model.model(x).last_hidden_state)


def test_v_to_o_only_without_gqa():
    gqa, _ = build_tiny_llama(num_key_value_heads=2)
    mha, _ = build_tiny_llama(num_key_value_heads=4)
    keys = lambda m: [g.key for g in get_mapping(m).applicable_groups(m.model.layers[0])]  # noqa: E731
    assert "self_attn.v_proj->o_proj" not in keys(gqa)
    assert keys(mha) == [
        "input_layernorm->q_proj,k_proj,v_proj",
        "self_attn.v_proj->o_proj",
        "post_attention_layernorm->gate_proj,up_proj",
        "mlp.up_proj->down_proj",
    ]


def test_group_absmax_matches_direct_hooks(tiny64):
    x = _tokens(4, 16)
    stats = collect_group_absmax(tiny64, get_mapping(tiny64), x, device=CPU, batch_size=3)
    seen = {}
    hooks = []
    for i, layer in enumerate(tiny64.model.layers):
        for rel in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            def hook(_m, args, key=f"{i}.{rel}"):
                seen[key] = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            hooks.append(layer.get_submodule(rel).register_forward_pre_hook(hook))
    with torch.no_grad():
        tiny64(x)
    for h in hooks:
        h.remove()
    mapping = get_mapping(tiny64)
    assert len(stats) == 2 * 3  # v->o is not applicable under GQA
    for i in range(2):
        for g in mapping.applicable_groups(tiny64.model.layers[i]):
            assert torch.equal(stats[group_key(f"model.layers.{i}", g)], seen[f"{i}.{g.linears[0]}"])


def test_auto_batch_size():
    assert auto_batch_size(128, 2048) == 8  # at most 16384 tokens per chunk
    assert auto_batch_size(4, 512) == 4
    assert auto_batch_size(4, 512, batch_size=3) == 3
    assert auto_batch_size(2, 100000) == 1


@pytest.mark.gpu
def test_offloaded_model_quantizes_block_by_block_on_cuda():
    """The model stays on CPU; each block visits the GPU for its turn and goes back."""
    model, _ = build_tiny_llama()
    x = _tokens(2, 16)
    devices = []

    def fn(ctx: BlockContext) -> None:
        devices.append(ctx.module("mlp.down_proj").weight.device.type)

    run_sequential(model, get_mapping(model), x, fn, device=torch.device("cuda"))
    assert devices == ["cuda", "cuda"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_collect_without_early_exit_returns_the_block_outputs(tiny64):
    got = {}

    def fn(ctx: BlockContext):
        outs = ctx.collect(["mlp.down_proj"], lambda *a: None, early_exit=False)
        got[ctx.index] = torch.cat(outs)
        assert all(torch.equal(a, b) for a, b in zip(outs, ctx.forward()))
        assert ctx.collect(["mlp.down_proj"], lambda *a: None, early_exit=True) is None
        return outs  # reused as the next block's inputs

    x = _tokens(3, 16)
    run_sequential(tiny64, get_mapping(tiny64), x, fn, device=CPU, batch_size=2)
    with torch.no_grad():
        hidden = tiny64.model(x, output_hidden_states=True).hidden_states
    assert torch.equal(got[0], hidden[1])


def test_released_inputs_are_gone_and_the_returned_outputs_flow_on(tiny64):
    """A callback that returns its block's outputs may free the inputs early (AWQ after its capture
    pass); the engine then feeds the returned outputs on, and the model's hidden states come out."""
    last = []

    def fn(ctx: BlockContext):
        outs = ctx.collect(["mlp.down_proj"], lambda *a: None, early_exit=False)
        ctx.release_inputs()
        assert ctx.inputs.hidden == [] and len(ctx.inputs.kwargs) == len(outs)
        if ctx.index == len(ctx.mapping.blocks(tiny64)) - 1:
            last.extend(outs)
        return outs

    x = _tokens(3, 16)
    run_sequential(tiny64, get_mapping(tiny64), x, fn, device=CPU, batch_size=2, returns_outputs=True)
    with torch.no_grad():
        ref = tiny64.model(x).last_hidden_state
    assert torch.equal(tiny64.model.norm(torch.cat(last)), ref)


def test_collect_releasing_inputs_frees_each_chunk_after_its_forward(tiny64):
    """``collect(release_inputs=True)`` (AWQ's capture, SmoothQuant+'s fp statistics) gives the same
    outputs and calls as without it; each input chunk is empty once its forward is done."""
    seen, empty_before = [], []

    def fn(ctx: BlockContext):
        want = ctx.forward()
        calls = []

        def on(n, x, kw, ci):
            calls.append((n, ci, x.clone()))
            empty_before.append([h.numel() == 0 for h in ctx.inputs.hidden[:ci]])

        outs = ctx.collect(["self_attn", "mlp.down_proj"], on, early_exit=False, release_inputs=True)
        assert ctx.inputs.hidden == [] and all(torch.equal(a, b) for a, b in zip(outs, want))
        seen.append(calls)
        return outs

    x = _tokens(5, 16)
    run_sequential(tiny64, get_mapping(tiny64), x, fn, device=CPU, batch_size=2, returns_outputs=True)
    assert [len(c) for c in seen] == [6, 6]  # 3 chunks x 2 modules, every block
    assert all(all(e) for e in empty_before) and any(empty_before)
    with torch.no_grad():
        hidden = tiny64.model(x, output_hidden_states=True).hidden_states
    got = torch.cat([x for n, _ci, x in seen[1] if n == "self_attn"])
    assert torch.equal(got, tiny64.model.layers[1].input_layernorm(hidden[1]))


def test_forward_releasing_inputs_gives_the_same_outputs(tiny64):
    """The engine's last pass over a finished block frees each input chunk once its forward is done."""
    got = []

    def fn(ctx: BlockContext):
        want = ctx.forward()
        sizes = []
        block_forward = ctx.block.forward

        def spy(*a, **k):
            sizes.append([h.numel() for h in ctx.inputs.hidden])
            return block_forward(*a, **k)

        ctx.block.forward = spy
        try:
            outs = ctx.forward(release_inputs=True)
        finally:
            del ctx.block.forward
        assert ctx.inputs.hidden == [] and all(torch.equal(a, b) for a, b in zip(outs, want))
        got.append(sizes)
        return outs

    run_sequential(tiny64, get_mapping(tiny64), _tokens(5, 16), fn, device=CPU, batch_size=2, returns_outputs=True)
    # 3 chunks: before chunk i's forward, chunks < i are already freed
    assert [[n == 0 for n in sz[:i]] for i, sz in enumerate(got[0])] == [[], [True], [True, True]]


def test_reuse_heap_runs_the_pass_in_one_working_set_with_the_same_values(tiny64, monkeypatch):
    """``reuse_heap``: the chunk loop runs inside ``repeated_allocations`` (only the allocator's
    thresholds change), with the same inputs seen and the same outputs; the engine's own last pass
    over a block whose callback returns nothing uses it (GPTQ at llm-compressor's schedule)."""
    import contextlib

    import quantlab.calib.sequential as seq

    state = {"inside": False, "entered": 0}

    @contextlib.contextmanager
    def spy():
        state["inside"], state["entered"] = True, state["entered"] + 1
        try:
            yield
        finally:
            state["inside"] = False

    monkeypatch.setattr(seq, "repeated_allocations", spy)
    where = []

    def fn(ctx: BlockContext) -> None:
        seen = {False: [], True: []}
        outs = {}
        for reuse in (False, True):
            outs[reuse] = ctx.collect(["mlp.down_proj"], lambda n, x, kw, ci, r=reuse: seen[r].append(
                (x.clone(), state["inside"])), early_exit=False, reuse_heap=reuse)
        assert [x for x, _ in seen[False]] and all(torch.equal(a[0], b[0]) for a, b in zip(seen[False], seen[True]))
        assert [i for _, i in seen[False]] == [False] * 3 and [i for _, i in seen[True]] == [True] * 3
        assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
        assert all(torch.equal(a, b) for a, b in zip(ctx.forward(reuse_heap=True), outs[False]))
        block_forward = ctx.block.forward
        ctx.block.forward = lambda *a, **k: (where.append(state["inside"]), block_forward(*a, **k))[1]

    run_sequential(tiny64, get_mapping(tiny64), _tokens(5, 16), fn, device=CPU, batch_size=2)
    # per block: one collect and one forward with it, then the engine's last pass (3 chunks, all inside)
    assert state["entered"] == 3 * len(tiny64.model.layers) and where == [True] * 3 * len(tiny64.model.layers)


# ------------------------------------------------------------------ variable-length calibration data
def _seqs(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in lengths]


def test_plan_chunks_groups_equal_lengths_deterministically():
    seqs = _seqs([5, 3, 5, 7, 3, 5])
    plan = plan_chunks(seqs, batch_size=2)
    # longest first, source order inside a length, at most batch_size sequences per chunk
    assert [c.index.tolist() for c in plan] == [[3], [0, 2], [5], [1, 4]]
    for c in plan:
        assert torch.equal(c.tokens, torch.stack([seqs[i] for i in c.index.tolist()]))
    assert [c.index.tolist() for c in plan_chunks(seqs, batch_size=2)] == [c.index.tolist() for c in plan]
    # automatic size without a model: at most 16384 tokens per chunk (one sequence longer than it is a chunk of its own)
    big = plan_chunks(_seqs([6000] * 5 + [20000]))
    assert [c.index.tolist() for c in big] == [[5], [0, 1], [2, 3], [4]]
    assert all(c.tokens.numel() <= MAX_CHUNK_TOKENS for c in big[1:])
    assert [c.index.tolist() for c in first_sequences(plan, 3)] == [[0, 2], [1]]


def test_plan_of_equal_length_sequences_is_the_tensor_plan():
    x = _tokens(5, 24)
    for bs, want in ((None, [[0, 1, 2, 3, 4]]), (2, [[0, 1], [2, 3], [4]])):
        a, b = plan_chunks(x, bs), plan_chunks(list(x), bs)
        assert [c.index.tolist() for c in a] == [c.index.tolist() for c in b] == want
        assert all(torch.equal(p.tokens, q.tokens) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="sequence 1"):
        plan_chunks([torch.arange(3), torch.arange(0)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_variable_length_no_cross_sequence_attention(tiny64, attn):
    """Each sequence's block inputs (blocks 0 and 1) equal those of that sequence run alone; kwargs fit each chunk."""
    tiny64.set_attn_implementation(attn)
    seqs = _seqs([9, 4, 9, 6, 4, 12, 9])
    seen = {}

    def fn(ctx: BlockContext) -> None:
        seen[ctx.index] = (list(ctx.inputs.hidden), list(ctx.inputs.index), list(ctx.inputs.kwargs), ctx.inputs.n_tokens)

    run_sequential(tiny64, get_mapping(tiny64), seqs, fn, device=CPU, batch_size=2)
    for blk in (0, 1):
        hidden, index, kwargs, n_tokens = seen[blk]
        assert n_tokens == sum(len(s) for s in seqs)
        assert sorted(i for ix in index for i in ix.tolist()) == list(range(len(seqs)))
        for h, ix, kw in zip(hidden, index, kwargs):
            assert kw["position_embeddings"][0].shape[-2] == h.shape[1]  # rotary of this chunk's length
            mask = kw.get("attention_mask")
            assert mask is None or tuple(mask.shape[-2:]) == (h.shape[1], h.shape[1])
            for r, i in enumerate(ix.tolist()):
                with torch.no_grad():
                    alone = tiny64.model(seqs[i][None], output_hidden_states=True).hidden_states[blk][0]
                # batched vs single matmuls differ by <= 1e-13 in float64; attention leaking across
                # sequences would change these values at O(1)
                assert torch.allclose(h[r], alone, rtol=0, atol=1e-10), (blk, i)


def test_variable_length_equal_lengths_identical_to_tensor(tiny64):
    x = _tokens(5, 24)
    outs = {}
    for key, toks in {"tensor": x, "list": list(x)}.items():
        got = []

        def fn(ctx: BlockContext, got=got):
            got.append([h.clone() for h in ctx.inputs.hidden])

        run_sequential(tiny64, get_mapping(tiny64), toks, fn, device=CPU, batch_size=2)
        outs[key] = got
    assert all(torch.equal(a, b) for la, lb in zip(outs["tensor"], outs["list"]) for a, b in zip(la, lb))


def test_layer_error_reads_variable_length_calibration(tmp_path):
    """The layer diagnostics run each calibration sequence unpadded and count only real tokens."""
    from quantlab.evals.layer_error import LayerErrorEval
    from quantlab.formats.spec import QuantFormat
    from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
    from quantlab.types import CalibData, RunContext, tokens_sha256

    def run(tokens):
        model, tok = build_tiny_llama(dtype=torch.float64)
        q = RTNQuantizer(RTNConfig(format=QuantFormat(bits=3, group_size=32)))
        fp = {n: m.weight.detach().clone() for n, m in q.target_linears(model)}
        seqs = tokens if isinstance(tokens, torch.Tensor) else tuple(tokens)
        lens = [seqs.shape[1]] * seqs.shape[0] if isinstance(seqs, torch.Tensor) else [len(s) for s in seqs]
        calib = CalibData(seqs, "random", len(lens), max(lens), 0, tokens_sha256(seqs))
        ctx = RunContext(device=CPU, seed=0, output_dir=tmp_path, calib=calib, fp_weights=fp)
        q.quantize(model, calib, ctx)
        return LayerErrorEval(max_samples=3, batch_size=2).run(model, tok, ctx)

    x = _tokens(4, 16)
    a, b = run(x), run(list(x))
    assert a.tables == b.tables and a.metrics == b.metrics
    v = run(_seqs([9, 4, 9, 6]))
    prov = v.provenance["layer/mean_output_sqnr_db"]
    assert prov["n_rows"] == 3 and prov["n_tokens"] == 9 + 4 + 9 and prov["seqlen"] == 9


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value(bad):
    t = torch.zeros(2, 5, 7)
    t[1, 3, 4] = bad
    with pytest.raises(DataError, match="1 NaN/inf values"):
        check_finite(t, "here")


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    # the cheap check (a non-finite sum) sends this to the exact one, which passes it
    t = torch.full((4,), 3e38)
    assert not torch.isfinite(t.sum())
    check_finite(t, "here")
    check_finite(torch.full((3,), 60000.0, dtype=torch.float16), "here")
