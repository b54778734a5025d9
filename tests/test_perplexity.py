"""Perplexity protocols checked against independent reimplementations on the tiny model."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import CONF
from hydra.utils import instantiate

from quantlab.errors import ConfigError, DataError, QuantlabError
from quantlab.evals.base import EVALUATORS
from quantlab.evals.perplexity import PerplexityEval, nll_of_window, windows_gptq, windows_strided
from quantlab.models.tiny import build_tiny_llama
from quantlab.types import RunContext

# ~560 bytes of text = 560 byte-tokenizer tokens
TEXT = (
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
) * 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_tok():
    return build_tiny_llama()


@pytest.fixture
def ctx(tmp_path):
    return RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path)


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # (1, n)


def test_window_helpers_hand_checked():
    assert windows_gptq(10, 4) == [(0, 4, 4), (4, 8, 4)]
    assert windows_gptq(10, 4, max_windows=1) == [(0, 4, 4)]
    assert windows_gptq(3, 4) == []
    assert windows_strided(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows_strided(10, 4, 3) == [(0, 4, 4), (3, 7, 3), (6, 10, 3)]
    assert windows_strided(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert windows_strided(9, 4, 4) == [(0, 4, 4), (4, 8, 4)]  # a 1-token window scores nothing
    assert windows_strided(10, 4, 2, max_windows=2) == [(0, 4, 4), (2, 6, 2)]
    assert windows_strided(3, 4, 2) == [(0, 3, 3)]


def test_nll_of_window():
    logits = torch.zeros(2, 3, 5)  # uniform over 5 classes
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    total, count = nll_of_window(logits, targets)
    assert count == 4 and total == pytest.approx(4 * math.log(5))
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    total, count = nll_of_window(logits, targets)
    expected = float(F.cross_entropy(logits, targets, reduction="sum"))
    assert count == 7 and total == pytest.approx(expected, rel=1e-6)
    assert nll_of_window(logits, torch.full((7,), -100)) == (0.0, 0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_gptq_matches_plain_loop(model_tok, ctx, text_file, batch_size):
    model, tok = model_tok
    ev = PerplexityEval(name="t", path=str(text_file), seqlen=64, batch_size=batch_size)
    res = ev.run(model, tok, ctx)

    ids = _ids(tok, TEXT)
    n = ids.shape[1] // 64
    losses = []
    with torch.no_grad():
        for i in range(n):
            x = ids[:, i * 64 : (i + 1) * 64]
            logits = model(x).logits
            losses.append(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())
    expected = math.exp(sum(losses) / len(losses))
    assert res.metrics["ppl/t"] == pytest.approx(expected, rel=1e-5)
    prov = res.provenance["ppl/t"]
    assert prov["n_windows"] == n and prov["n_tokens_scored"] == n * 63
    assert prov["n_tokens_total"] == ids.shape[1]


def _hf_docs_strided(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The transformers docs loop (perplexity.md), weighting each window's mean loss by its loss tokens."""
    seq_len = ids.shape[1]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            num_valid = int((target_ids[:, 1:] != -100).sum())  # tokens in the loss after the label shift
            nll_sum += loss.item() * num_valid
            n_tokens += num_valid
            prev_end = end
            if end == seq_len:
                break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("stride", [24, 64])
def test_strided_matches_hf_docs_loop(model_tok, ctx, text_file, stride):
    model, tok = model_tok
    ev = PerplexityEval(
        name="s", path=str(text_file), protocol="hf_strided", seqlen=64, stride=stride, batch_size=2
    )
    res = ev.run(model, tok, ctx)
    ids = _ids(tok, TEXT)
    assert res.metrics["ppl/s"] == pytest.approx(_hf_docs_strided(model, ids, 64, stride), rel=1e-5)
    prov = res.provenance["ppl/s"]
    if stride == 64:  # no overlap: every token but the first of each window is scored, tail included
        assert prov["n_tokens_scored"] == ids.shape[1] - prov["n_windows"]
    else:  # every token but the very first is scored exactly once
        assert prov["n_tokens_scored"] == ids.shape[1] - 1


def test_provenance_and_metric_name(model_tok, ctx):
    model, tok = model_tok
    ev = PerplexityEval(
        dataset="local", path="stdlib", protocol="hf_strided", seqlen=128, stride=64, max_windows=3
    )
    res = ev.run(model, tok, ctx)
    assert list(res.metrics) == ["ppl/local"] and math.isfinite(res.metrics["ppl/local"])
    prov = res.provenance["ppl/local"]
    for key in (
        "ppl_protocol", "seqlen", "stride", "dataset", "split", "path", "files", "text_sha256",
        "n_tokens_total", "n_tokens_scored", "n_windows", "max_windows", "tokenizer", "special_tokens",
        "bos_at_stream_start",
    ):
        assert key in prov, key
    assert prov["ppl_protocol"] == "hf_strided" and prov["n_windows"] == 3 and prov["max_windows"] == 3
    assert prov["files"][0] == "json/decoder.py" and prov["special_tokens"] == "reference"
    assert prov["bos_at_stream_start"] is False  # the tiny byte tokenizer adds no special token
    assert prov["n_tokens_scored"] == 127 + 2 * 64
    gptq = dataclasses.replace(ev, protocol="gptq_nonoverlap").run(model, tok, ctx)
    assert "stride" not in gptq.provenance["ppl/local"]
    assert gptq.provenance["ppl/local"]["text_sha256"] == prov["text_sha256"]


def test_model_state_untouched(ctx, text_file):
    model, tok = build_tiny_llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PerplexityEval(path=str(text_file), seqlen=64, max_windows=1).run(model, tok, ctx)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_path_is_data_error(model_tok, ctx, tmp_path):
    model, tok = model_tok
    missing = tmp_path / "nope" / "*.txt"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        PerplexityEval(name="x", path=str(missing), seqlen=64).run(model, tok, ctx)
    with pytest.raises(DataError, match="eval.x.path"):
        PerplexityEval(name="x", path=str(tmp_path / "nope.txt"), seqlen=64).run(model, tok, ctx)


def test_too_short_text_is_data_error(model_tok, ctx, text_file):
    model, tok = model_tok
    with pytest.raises(DataError, match="fewer than one window of seqlen=4096"):
        PerplexityEval(name="x", path=str(text_file), seqlen=4096).run(model, tok, ctx)


def test_non_finite_loss_raises(ctx, text_file):
    model, tok = build_tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(QuantlabError, match="non-finite loss"):
        PerplexityEval(path=str(text_file), seqlen=64).run(model, tok, ctx)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dataset": "ptb"}, "eval.p.dataset"),
        ({"protocol": "rolling"}, "eval.p.protocol"),
        ({"seqlen": 1}, "eval.p.seqlen"),
        ({"protocol": "hf_strided", "seqlen": 64, "stride": 65}, "eval.p.stride"),
        ({"max_windows": 0}, "eval.p.max_windows"),
        ({"batch_size": 0}, "eval.p.batch_size"),
        ({"path": None}, "eval.p.path"),
        ({"dataset": "c4", "split": "test"}, "eval.p.split"),
        ({"dataset": "c4", "split": "validation", "protocol": "hf_strided"}, "eval.p.protocol"),
    ],
)
def test_config_validation(kwargs, key):
    with pytest.raises(ConfigError) as err:
        PerplexityEval(name="p", **kwargs)
    assert err.value.key == key and key in str(err.value)


def test_hub_dataset_offline_is_data_error(model_tok, ctx, monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    model, tok = model_tok
    with pytest.raises(DataError, match=r"wikitext.*Offline\? Use eval=\[ppl_local\]"):
        PerplexityEval(name="w", dataset="wikitext2", path=None, seqlen=64).run(model, tok, ctx)


def test_registered():
    assert EVALUATORS.get("perplexity") is PerplexityEval and PerplexityEval.kind == "perplexity"


@pytest.mark.parametrize("path", sorted((CONF / "eval").glob("ppl_*.yaml")), ids=lambda p: p.stem)
def test_eval_yamls_instantiate(path):
    raw = yaml.safe_load(path.read_text())
    assert list(raw) == [path.stem], "one top-level key equal to the file stem"
    ev = instantiate(raw[path.stem])
    assert isinstance(ev, PerplexityEval) and ev.name


def test_ppl_local_yaml_runs(model_tok, ctx):
    model, tok = model_tok
    ev = instantiate(yaml.safe_load((CONF / "eval" / "ppl_local.yaml").read_text())["ppl_local"])
    res = dataclasses.replace(ev, max_windows=2).run(model, tok, ctx)
    assert math.isfinite(res.metrics["ppl/local_stdlib"])
    assert res.provenance["ppl/local_stdlib"]["n_tokens_scored"] == 2 * 511


def test_c4_uses_gptq_windows(model_tok, ctx, monkeypatch):
    docs = ["tiny", TEXT, TEXT[::-1], "x" * 10]
    monkeypatch.setattr("quantlab.evals.perplexity.load_hub_texts", lambda name, split, hint="": docs)
    model, tok = model_tok
    ev = PerplexityEval(name="c4", dataset="c4", path=None, split="validation", seqlen=32, max_windows=5)
    res = ev.run(model, tok, ctx)
    prov = res.provenance["ppl/c4"]
    assert prov["c4_windows"] == 5 and prov["c4_seed"] == 0 and prov["n_tokens_total"] == 5 * 32
    assert prov["n_windows"] == 5 and prov["n_tokens_scored"] == 5 * 31 and prov["split"] == "validation"
    assert math.isfinite(res.metrics["ppl/c4"])
