"""Text sources and calibration sets: offline, deterministic, clear errors."""
from __future__ import annotations

import re
import time

import pytest
import torch
import yaml
from conftest import CONF
from hydra.utils import instantiate

from quantlab.calib.datasets import CalibConfig, build_calib
from quantlab.data.text import (
    STDLIB_CORPUS,
    humaneval_prompts,
    load_hub_texts,
    read_texts,
    relative_names,
    resolve_paths,
    stdlib_corpus_paths,
    text_sha256,
)
from quantlab.errors import ConfigError, DataError
from quantlab.models.tiny import byte_tokenizer
from quantlab.types import tokens_sha256


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_stdlib_corpus_resolves():
    assert STDLIB_CORPUS[0] == "json/decoder.py"
    paths = resolve_paths("stdlib", "calib.path")
    assert paths == stdlib_corpus_paths() and len(paths) == len(STDLIB_CORPUS) >= 12
    assert all(p.is_file() for p in paths)
    assert relative_names(paths) == list(STDLIB_CORPUS)
    texts = read_texts(paths, "calib.path")
    assert "class JSONDecoder" in texts[0]
    assert text_sha256(texts) == text_sha256(list(texts)) != text_sha256(texts[::-1])


def test_resolve_dir_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.md", ".hidden"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in resolve_paths(str(tmp_path), "k")] == ["a.txt", "b.txt", "c.md"]
    assert [p.name for p in resolve_paths(str(tmp_path / "*.txt"), "k")] == ["a.txt", "b.txt"]
    assert resolve_paths(str(tmp_path / "a.txt"), "k") == [tmp_path / "a.txt"]
    with pytest.raises(DataError, match="k: the glob"):
        resolve_paths(str(tmp_path / "*.nope"), "k")


def test_humaneval_prompts():
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    assert prompts[0].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert all(isinstance(p, str) and p for p in prompts)


def test_random_calib(tok):
    cfg = CalibConfig(source="random", n_samples=8, seqlen=64, seed=0)
    a, b = build_calib(cfg, tok), build_calib(cfg, tok)
    assert a.tokens.shape == (8, 64) and a.tokens.dtype == torch.int64
    assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < len(tok)
    assert a.sha256 == b.sha256 == tokens_sha256(a.tokens)
    assert build_calib(CalibConfig(source="random", n_samples=8, seqlen=64, seed=1), tok).sha256 != a.sha256
    assert int(build_calib(cfg, None, vocab_size=5).tokens.max()) < 5


def test_random_calib_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_calib(CalibConfig(source="random", n_samples=2, seqlen=8), tok)
    assert torch.equal(torch.rand(3), expected)


def test_local_random_windows(tok):
    cfg = CalibConfig(source="local", path="stdlib", n_samples=16, seqlen=512, seed=0)
    a, b = build_calib(cfg, tok), build_calib(cfg, tok)
    assert a.tokens.shape == (16, 512) and a.tokens.dtype == torch.int64
    assert a.sha256 == b.sha256 and torch.equal(a.tokens, b.tokens)
    other = build_calib(CalibConfig(source="local", path="stdlib", n_samples=16, seqlen=512, seed=1), tok)
    assert other.sha256 != a.sha256
    prov = a.describe()
    assert prov["files"][0] == "json/decoder.py" and prov["source"] == "local"
    assert prov["sampling"] == "random_windows" and prov["n_tokens_available"] > 16 * 512
    assert prov["sha256"] == a.sha256 and len(prov["text_sha256"]) == 64
    # windows are verbatim slices of the source text (byte tokenizer: decode round-trips)
    corpus = "\n\n".join(read_texts(stdlib_corpus_paths(), "k"))
    assert tok.decode(a.tokens[0].tolist()) in corpus


def test_humaneval_chunks_all(tok):
    cfg = CalibConfig(source="humaneval", sampling="chunks", n_samples=-1, seqlen=512)
    a = build_calib(cfg, tok)
    n_avail = a.provenance["n_tokens_available"]
    assert a.tokens.shape == (n_avail // 512, 512) and a.n_samples == n_avail // 512
    assert a.provenance["separator"] == "eos" and a.provenance["n_documents"] == 164
    assert int((a.tokens == tok.eos_token_id).sum()) > 100  # documents separated by EOS
    assert build_calib(cfg, tok).sha256 == a.sha256
    first4 = build_calib(CalibConfig(source="humaneval", sampling="chunks", n_samples=4, seqlen=512), tok)
    assert torch.equal(first4.tokens, a.tokens[:4])
    cfg1 = CalibConfig(source="humaneval", sampling="chunks", n_samples=4, seqlen=512, seed=1)
    reordered = build_calib(cfg1, tok)
    assert reordered.sha256 != first4.sha256


def test_too_little_text(tok, tmp_path):
    (tmp_path / "small.txt").write_text("x" * 100)
    with pytest.raises(DataError, match="only 100 tokens available"):
        build_calib(CalibConfig(source="local", path=str(tmp_path), n_samples=1, seqlen=512), tok)
    with pytest.raises(DataError, match="only 100 tokens available"):
        cfg = CalibConfig(source="local", path=str(tmp_path), n_samples=3, seqlen=50, sampling="chunks")
        build_calib(cfg, tok)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"source": "bogus"}, "calib.source"),
        ({"source": "random", "n_samples": 0}, "calib.n_samples"),
        ({"source": "random", "n_samples": -2}, "calib.n_samples"),
        ({"source": "local", "path": "stdlib", "n_samples": -1}, "calib.n_samples"),  # -1 needs chunks
        ({"source": "random", "seqlen": 1}, "calib.seqlen"),
        ({"source": "random", "seed": -1}, "calib.seed"),
        ({"source": "random", "sampling": "sliding"}, "calib.sampling"),
        ({"source": "local"}, "calib.path"),
        ({"source": "pile", "split": "train"}, "calib.split"),
    ],
)
def test_config_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key) as err:
        CalibConfig(**kwargs)
    assert err.value.key == key


def test_missing_path(tok, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"calib.path.*{re.escape(str(missing))}"):
        build_calib(CalibConfig(source="local", path=str(missing), n_samples=1, seqlen=8), tok)


def test_undecodable_file(tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=f"calib.path.*{re.escape(str(bad))}.*UTF-8"):
        build_calib(CalibConfig(source="local", path=str(bad), n_samples=1, seqlen=2), tok)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Force offline mode and an empty datasets cache, also when datasets was already imported."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.mark.parametrize(
    ("source", "split"), [("wikitext2", "train"), ("c4", "train"), ("pile", "validation")]
)
def test_hub_sources_fail_fast_offline(tok, offline_hub, source, split):
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        build_calib(CalibConfig(source=source, split=split, n_samples=2, seqlen=16), tok)
    msg = str(err.value)
    assert "\n" not in msg and "Hugging Face Hub" in msg
    assert "Offline?" in msg and "calib.source=local calib.path=" in msg
    assert time.monotonic() - start < 10


def test_load_hub_texts_rejects_unknown_split():
    with pytest.raises(DataError, match="no split 'test'"):
        load_hub_texts("c4", "test")


@pytest.mark.parametrize("path", sorted((CONF / "calib").glob("*.yaml")), ids=lambda p: p.stem)
def test_calib_yamls_instantiate(path):
    raw = yaml.safe_load(path.read_text())
    assert raw["_target_"] == "quantlab.calib.datasets.CalibConfig"
    cfg = instantiate(raw)
    assert isinstance(cfg, CalibConfig) and cfg.seqlen >= 64


def test_small_yamls_build(tok):
    for stem in ("random_8x64", "local_stdlib"):
        cfg = instantiate(yaml.safe_load((CONF / "calib" / f"{stem}.yaml").read_text()))
        data = build_calib(cfg, tok)
        assert data.tokens.shape == (cfg.n_samples, cfg.seqlen)


def test_c4_gptq_doc_windows(tok, monkeypatch):
    alphabet = "".join(chr(97 + i % 26) for i in range(300))
    docs = ["short", "", "a" * 20 + alphabet, "z" * 31, "0123456789" * 10]
    monkeypatch.setattr("quantlab.calib.datasets.load_hub_texts", lambda name, split, hint="": docs)
    cfg = CalibConfig(source="c4", split="train", n_samples=6, seqlen=32, seed=0)
    a, b = build_calib(cfg, tok), build_calib(cfg, tok)
    assert a.tokens.shape == (6, 32) and a.sha256 == b.sha256
    assert a.provenance["scheme"] == "gptq_c4_doc_windows" and a.provenance["n_docs_long_enough"] == 2
    for row in a.tokens:  # every window is a slice of one document longer than seqlen
        assert any(tok.decode(row.tolist()) in d for d in docs if len(d) > 32)
    with pytest.raises(DataError, match="no document has more than seqlen=400"):
        build_calib(CalibConfig(source="c4", split="train", n_samples=1, seqlen=400), tok)


def test_calibration_corpus_is_disjoint_from_evaluation_corpus():
    from quantlab.data.text import STDLIB_CALIB_CORPUS, read_texts

    assert not set(STDLIB_CALIB_CORPUS) & set(STDLIB_CORPUS)
    calib_paths = resolve_paths("stdlib_calib", "calib.path")
    assert len(calib_paths) == len(STDLIB_CALIB_CORPUS) and all(p.is_file() for p in calib_paths)
    assert len("".join(read_texts(calib_paths, "calib.path"))) > 100_000  # enough for 16 x 512 tokens
    # the shipped defaults use them that way round
    import yaml
    from conftest import CONF

    assert yaml.safe_load((CONF / "calib" / "local_stdlib.yaml").read_text())["path"] == "stdlib_calib"
    assert yaml.safe_load((CONF / "eval" / "ppl_local.yaml").read_text())["ppl_local"]["path"] == "stdlib"
