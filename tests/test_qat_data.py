"""LLM-QAT data-free generation: greedy prefixes, strategies, first-token modes, top-k sampling, resume."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import compose

from quantlab.cli import build_spec
from quantlab.errors import ConfigError
from quantlab.qat.datagen import SEQUENCES, DataGenConfig, generate_data
from quantlab.tracking.variant import make_variant

pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    """Top-1 tokens one at a time, written out here (no cache, no batching): the test's reference."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out


def test_hybrid_sequences_start_with_the_configured_greedy_prefix(tiny, tmp_path):
    model, tok = tiny
    cfg = DataGenConfig(n_sequences=6, max_length=12, greedy_prefix=(3, 5), seed=1, batch_size=4)
    rows = generate_data(model, tok, cfg, tmp_path)
    assert [r["index"] for r in rows] == list(range(6)) and {r["greedy_len"] for r in rows} <= {3, 5}
    eos = tok.eos_token_id
    for r in rows:
        j, ids = r["greedy_len"], r["ids"]
        assert ids[0] == r["first"] and r["first"] not in tok.all_special_ids
        assert ids[:j] == _greedy_continuation(model, [r["first"]], j - 1)[: len(ids[:j])]
        assert len(ids) == 12 or ids[-1] == eos  # full length unless the teacher ended the text
    assert len({tuple(r["ids"]) for r in rows}) == 6


def test_strategies_and_first_token_modes(tiny, tmp_path):
    model, tok = tiny
    greedy = generate_data(model, tok, DataGenConfig(n_sequences=3, max_length=8, strategy="greedy"), tmp_path / "g")
    for r in greedy:
        assert r["ids"] == _greedy_continuation(model, [r["first"]], 7)[: len(r["ids"])]
    enum = DataGenConfig(n_sequences=6, max_length=6, first_token="enumerate", greedy_prefix=(3, 4, 5))
    rows = generate_data(model, tok, enum, tmp_path / "e")
    assert [(r["first"], r["greedy_len"]) for r in rows] == [(0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 5)]


def test_generation_resumes_without_duplicates_and_refuses_other_settings(tiny, tmp_path):
    model, tok = tiny
    cfg = DataGenConfig(n_sequences=5, max_length=10, seed=3, batch_size=2)
    full = generate_data(model, tok, cfg, tmp_path / "full")
    part = tmp_path / "part"
    generate_data(model, tok, DataGenConfig(n_sequences=5, max_length=10, seed=3, batch_size=2), part)
    lines = (part / SEQUENCES).read_text().splitlines()
    (part / SEQUENCES).write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-write
    resumed = generate_data(model, tok, cfg, part)
    assert resumed == full
    with pytest.raises(ConfigError, match="quantizer.data"):
        generate_data(model, tok, DataGenConfig(n_sequences=5, max_length=11, seed=3, batch_size=2), part)


def test_equal_starts_still_sample_different_continuations(tiny, tmp_path):
    """Two sequences from the same first token and prefix are seeded by their index, not their ids."""
    model, tok = tiny
    cfg = DataGenConfig(n_sequences=2, max_length=16, first_token="enumerate", greedy_prefix=(3, 3))
    a, b = generate_data(model, tok, cfg, tmp_path)
    assert a["ids"][:3] == b["ids"][:3] and a["ids"] != b["ids"]


def test_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match="quantizer.data.strategy"):
        DataGenConfig(strategy="beam")
    with pytest.raises(ConfigError, match="quantizer.data.greedy_prefix"):
        DataGenConfig(greedy_prefix=(0,))


def _sampled_ranks(model, rows) -> list[tuple[float, float]]:
    """``(logit of the sampled token, 50th largest logit)`` at every sampled position (one full forward
    per sequence: position ``p`` is drawn from the teacher's distribution after ``ids[:p]``)."""
    out = []
    with torch.no_grad():
        for r in rows:
            logits = model(torch.tensor([r["ids"]])).logits[0]
            for p in range(r["greedy_len"], len(r["ids"])):
                out.append((float(logits[p - 1, r["ids"][p]]), float(logits[p - 1].topk(50).values[-1])))
    return out


def test_sampling_defaults_to_the_reference_top_50_and_top_k_0_samples_the_full_softmax(tiny, tmp_path):
    """The reference (LLM-QAT's generate_data.py, HF generate's default top_k=50) samples among the 50
    most likely tokens; top_k=0 (the full softmax over the tiny model's 259 tokens) goes beyond them."""
    model, tok = tiny
    assert DataGenConfig().top_k == 50
    ref = DataGenConfig(n_sequences=4, max_length=40, strategy="sample", seed=0, batch_size=4)
    drawn = _sampled_ranks(model, generate_data(model, tok, ref, tmp_path / "k50"))
    assert len(drawn) == 156  # 4 sequences x 39 sampled tokens (no EOS drawn)
    # 1e-4: room for float noise between the cached decode and a full forward (measured: the lowest
    # sampled logit is exactly the 50th largest, margin 0.0)
    assert all(logit >= kth - 1e-4 for logit, kth in drawn)
    full = generate_data(model, tok, dataclasses.replace(ref, top_k=0), tmp_path / "k0")
    outside = [logit < kth - 1e-3 for logit, kth in _sampled_ranks(model, full)]
    assert len(outside) == 156 and sum(outside) >= 20  # measured 67 of 156 outside the top 50 (a flat teacher)


@pytest.mark.parametrize("preset", ["llm_qat", "llm_qat_paper", "llm_qat_cpu"])
def test_llm_qat_presets_sample_the_teacher_data_like_the_reference(preset):
    """Every LLM-QAT preset composes with the reference's top_k=50, and the variant records it."""
    spec = build_spec(compose(["+exp=demo_tiny", f"quantizer={preset}"]))
    assert spec.quantizer.data.top_k == 50 and spec.quantizer.data.temperature == 1.0
    assert make_variant(spec)["settings"]["quantizer"]["config"]["data"]["top_k"] == 50
    other = build_spec(compose(["+exp=demo_tiny", f"quantizer={preset}", "quantizer.data.top_k=0"]))
    assert make_variant(other)["id"] != make_variant(spec)["id"]
