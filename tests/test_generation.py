"""Generation engine: batched greedy == one at a time, stop sequences, sampling, bookkeeping."""
from __future__ import annotations

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.generation import DecodingConfig, GenRequest, choose_backend, generate, truncate_at_stop
from quantlab.generation.hf import _groups

PROMPTS = [
    "def add(a, b):\n    ",
    "import os\nclass Widget:\n    def __init__(self):\n        self.x = 1\n\ndef f",
    "x = 1",
    "hello world " * 6,
    "for i in range(10):\n",
]


def texts(out):
    return [[c.text for c in comps] for comps in out]


def test_truncate_at_stop_cuts_at_the_earliest_stop():
    assert truncate_at_stop("a\nb\ndef c\n#x", ["\n#", "\ndef"]) == "a\nb"
    assert truncate_at_stop("no stop here", ["\nclass"]) == "no stop here"
    assert truncate_at_stop("x\nclass", []) == "x\nclass"
    assert truncate_at_stop("\ndef at start", ["\ndef"]) == ""


def test_groups_by_stop_and_longest_prompt_first():
    reqs = [GenRequest("a", ("x",)), GenRequest("bbb", ("y",)), GenRequest("cc", ("x",)), GenRequest("d", ("y",))]
    assert _groups(reqs, [1, 3, 2, 1]) == [[2, 0], [1, 3]]


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_greedy_equals_one_prompt_at_a_time(tiny, batch_size):
    model, tok = tiny
    reqs = [GenRequest(p, ()) for p in PROMPTS]
    cfg = DecodingConfig(max_new_tokens=20, batch_size=batch_size)
    batched, stats = generate(model, tok, reqs, cfg)
    single = [generate(model, tok, [r], DecodingConfig(max_new_tokens=20, batch_size=1))[0][0][0] for r in reqs]
    assert [b[0] for b in batched] == single
    assert stats.batches == 1  # one stop group, decoded as one continuous batch
    assert stats.generated_tokens == 20 * len(PROMPTS)  # no stop and no EOS reached by the random model
    assert all(c[0].finish_reason == "length" and c[0].n_tokens == 20 for c in batched)


def test_stop_sequence_cuts_the_completion_and_ends_the_row_early(tiny):
    model, tok = tiny
    cfg = DecodingConfig(max_new_tokens=40, batch_size=4)
    free, _ = generate(model, tok, [GenRequest(p) for p in PROMPTS], cfg)
    # pick, for the first prompt, a 2-character piece of its free-running output as the stop sequence
    text = free[0][0].text
    stop = text[10:12]
    cut = text[: text.find(stop)]
    reqs = [GenRequest(PROMPTS[0], (stop,)), GenRequest(PROMPTS[2], (stop,))]
    out, stats = generate(model, tok, reqs, cfg)
    assert out[0][0].text == cut
    assert out[0][0].finish_reason == "stop"
    assert out[0][0].n_tokens < 40
    # the other row in the batch is unaffected unless it produced the stop itself
    other = free[2][0].text
    assert out[1][0].text == truncate_at_stop(other, (stop,))


def test_sampling_is_seeded_and_top_k_1_equals_greedy(tiny):
    model, tok = tiny
    reqs = [GenRequest(p) for p in PROMPTS[:3]]
    sample = DecodingConfig(do_sample=True, temperature=0.9, top_k=0, top_p=1.0, n=3, max_new_tokens=12, seed=5)
    a, _ = generate(model, tok, reqs, sample)
    b, _ = generate(model, tok, reqs, sample)
    c, _ = generate(model, tok, reqs, DecodingConfig(**{**sample.__dict__, "seed": 6}))
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert all(len(x) == 3 for x in a)
    assert len({t for x in a for t in [c.text for c in x]}) > 3  # samples differ from each other
    greedy, _ = generate(model, tok, reqs, DecodingConfig(max_new_tokens=12))
    top1, _ = generate(model, tok, reqs, DecodingConfig(do_sample=True, top_k=1, n=2, max_new_tokens=12))
    assert [[g[0].text] * 2 for g in greedy] == texts(top1)


def test_generation_leaves_the_model_as_it_was(tiny):
    model, tok = tiny
    gc = model.generation_config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    generate(model, tok, [GenRequest("abc")], DecodingConfig(max_new_tokens=4))
    assert model.training
    assert model.generation_config is gc
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_requests_choose_whether_the_tokenizer_adds_special_tokens(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    real_call = type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.append((text, kwargs.get("add_special_tokens")))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    reqs = [GenRequest("<chat>abc", add_special_tokens=False), GenRequest("abc")]
    generate(model, tok, reqs, DecodingConfig(max_new_tokens=2))
    assert ("<chat>abc", False) in seen and ("abc", True) in seen


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"temperature": 0}, "generation.temperature"),
        ({"top_p": 1.5}, "generation.top_p"),
        ({"top_k": -1}, "generation.top_k"),
        ({"n": 4}, "generation.n_samples"),  # greedy with n > 1
        ({"max_new_tokens": 0}, "generation.max_new_tokens"),
        ({"backend": "tgi"}, "generation.backend"),
    ],
)
def test_decoding_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        DecodingConfig(**kwargs)
    assert e.value.key == key


def test_backend_choice_on_cpu(tiny):
    model, _ = tiny
    assert choose_backend(model, DecodingConfig()) == "hf"
    with pytest.raises(ConfigError, match="vllm"):
        choose_backend(model, DecodingConfig(backend="vllm"))


def test_on_batch_reports_every_prompt_once(tiny):
    model, tok = tiny
    seen = []
    out, _ = generate(
        model, tok, [GenRequest(p) for p in PROMPTS], DecodingConfig(max_new_tokens=3, batch_size=2),
        on_batch=lambda idx, comps: seen.extend(zip(idx, comps)),
    )
    assert sorted(i for i, _ in seen) == list(range(len(PROMPTS)))
    assert all(out[i] == c for i, c in seen)


def test_samples_do_not_depend_on_batching(tiny):
    """Every row samples from its own generator seeded by (seed, prompt, sample index)."""
    model, tok = tiny
    reqs = [GenRequest(p) for p in PROMPTS]
    cfg = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=30, n=2, max_new_tokens=10, seed=3)
    one, _ = generate(model, tok, reqs, DecodingConfig(**cfg, batch_size=1))
    many, _ = generate(model, tok, reqs, DecodingConfig(**cfg, batch_size=10))
    assert texts(one) == texts(many)
    sub, _ = generate(model, tok, reqs[2:4], DecodingConfig(**cfg, batch_size=4))  # a resumed subset
    assert texts(sub) == texts(one)[2:4]


def test_rows_leave_the_batch_when_done(tiny):
    """A row that stops early does not change the others, and its token count stops growing."""
    model, tok = tiny
    cfg = DecodingConfig(max_new_tokens=30, batch_size=8)
    free, _ = generate(model, tok, [GenRequest(p) for p in PROMPTS], cfg)
    stop = free[1][0].text[3:5]
    out, stats = generate(model, tok, [GenRequest(p, (stop,)) for p in PROMPTS], cfg)
    for f, o in zip(free, out):
        assert o[0].text == truncate_at_stop(f[0].text, (stop,))
        assert (o[0].finish_reason == "stop") == (len(o[0].text) < len(f[0].text))
    assert out[1][0].finish_reason == "stop" and out[1][0].n_tokens < 30
    assert stats.generated_tokens == sum(o[0].n_tokens for o in out)


def test_growing_cache_layer_admits_right_aligned_rows_and_trims():
    from quantlab.generation.kv_cache import GrowingLayer

    layer = GrowingLayer(capacity=4)
    k1, k2 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    layer.admit(k1, k1 + 1)
    layer.admit(k2, k2 + 1)  # longer than the live row: the live row shifts right
    assert layer.keys.shape == (2, 2, 5, 4)
    assert torch.equal(layer.keys[0, :, 2:], k1[0]) and torch.equal(layer.keys[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(layer.keys[1], k2[0]) and torch.equal(layer.values[1], k2[0] + 1)
    new = torch.randn(2, 2, 1, 4)
    keys, _ = layer.update(new, new)
    assert keys.shape == (2, 2, 6, 4) and torch.equal(keys[:, :, -1:], new)
    layer.batch_select_indices(torch.tensor([0]))
    layer.trim_left(2)
    assert torch.equal(layer.keys[0, :, :3], k1[0]) and layer.get_seq_length() == 4


def test_tensor_parallel_size_is_validated_and_needs_vllm():
    from quantlab.models.tiny import build_tiny_llama

    assert DecodingConfig(tensor_parallel_size=2, backend="vllm").tp_size() == 2
    assert DecodingConfig(tensor_parallel_size="auto").tp_size() == max(1, torch.cuda.device_count())
    for bad in (0, "two", 1.5):
        with pytest.raises(ConfigError, match="tensor_parallel_size"):
            DecodingConfig(tensor_parallel_size=bad)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        DecodingConfig(tensor_parallel_size=2, backend="hf")
    model, _ = build_tiny_llama()
    with pytest.raises(ConfigError, match="tensor_parallel_size"):  # auto backend, CPU model: no vLLM to shard
        choose_backend(model, DecodingConfig(tensor_parallel_size=2))
    assert choose_backend(model, DecodingConfig()) == "hf"


def test_tensor_parallel_size_joins_the_variant_only_when_set():
    """tensor_parallel_size=1 is how every run before it was made: it stays out of the variant, so those
    records keep their ids; another value can change greedy completions and is in it."""
    from quantlab.evals.code.humaneval import HumanEvalEval
    from quantlab.evals.sampling.sweep import SamplingSweep

    assert "tensor_parallel_size" not in HumanEvalEval(name="h").variant_settings()
    assert HumanEvalEval(name="h", backend="vllm", tensor_parallel_size=2).variant_settings()["tensor_parallel_size"] == 2
    assert "tensor_parallel_size" not in SamplingSweep(name="s").variant_settings()
    assert SamplingSweep(name="s", backend="vllm", tensor_parallel_size="auto").variant_settings()[
        "tensor_parallel_size"] == "auto"
