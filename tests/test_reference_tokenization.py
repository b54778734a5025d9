"""Special tokens and calibration sets as the reference code builds them (audit A10, A11), checked against
independent transcriptions of GPTQ's ``get_c4`` / eval stream, llm-awq's ``get_calib_dataset`` and
SmoothQuant's ``get_act_scales`` written here, with a Llama-like tokenizer (a BOS by default)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from tokenizers import processors

from quantlab.calib.datasets import CalibConfig, build_calib
from quantlab.data.text import awq_doc_blocks, gptq_doc_windows
from quantlab.evals.perplexity import PerplexityEval
from quantlab.models.tiny import byte_tokenizer

DOCS = [("doc %d " % i) * (3 + (i * 7) % 40) for i in range(60)] + ["", "   "]


@pytest.fixture(scope="module")
def llama_like():
    """The tiny byte tokenizer with Llama's post-processor: ``tokenizer(text)`` starts with BOS."""
    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                   special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    return tok


def _llm_awq_get_calib_dataset(rows, tokenizer, n_samples, block_size):
    """llm-awq ``awq/utils/calib_data.py`` after ``load_dataset(...).shuffle(seed=42)`` (datasets' shuffle is
    ``np.random.default_rng(seed).permutation``), transcribed."""
    dataset = [rows[i] for i in np.random.default_rng(42).permutation(len(rows))]
    samples, n_run = [], 0
    for line in dataset:
        line = line.strip()
        line_encoded = tokenizer.encode(line)
        if len(line_encoded) > 512:
            continue
        sample = torch.tensor([line_encoded])
        if sample.numel() == 0:
            continue
        samples.append(sample)
        n_run += 1
        if n_run == n_samples:
            break
    cat = torch.cat(samples, dim=1)
    n_split = cat.shape[1] // block_size
    return [cat[:, i * block_size:(i + 1) * block_size] for i in range(n_split)]


def test_awq_blocks_are_llm_awq_get_calib_dataset(llama_like):
    rows = DOCS + ["x" * 600]  # one document over 512 tokens: skipped
    ours, stats = awq_doc_blocks(rows, llama_like, n_docs=20, block=256, seed=42)
    ref = torch.cat(_llm_awq_get_calib_dataset(rows, llama_like, 20, 256), dim=0)
    assert torch.equal(ours, ref)
    # n_samples counts documents: 20 short documents make far fewer than 20 blocks of 256
    assert stats["n_docs_used"] == 20 and ours.shape[0] == stats["n_tokens_concatenated"] // 256 < 20
    assert (ours == llama_like.bos_token_id).sum() >= 1      # a BOS per document, inside the stream


def test_awq_blocks_through_the_calibration_config(llama_like, tmp_path):
    for i, d in enumerate(DOCS[:40]):
        (tmp_path / f"{i:02d}.txt").write_text(d)
    cfg = CalibConfig(source="local", path=str(tmp_path), sampling="awq_blocks", n_samples=30, seqlen=64, seed=42)
    data = build_calib(cfg, llama_like)
    rows = [(tmp_path / f"{i:02d}.txt").read_text() for i in range(40)]
    ref = torch.cat(_llm_awq_get_calib_dataset(rows, llama_like, 30, 64), dim=0)
    assert torch.equal(data.tokens, ref)
    assert data.provenance["scheme"] == "llm-awq get_calib_dataset" and data.n_samples == ref.shape[0]


def _gptq_get_c4(rows, tokenizer, nsamples, seed, seqlen):
    """GPTQ ``datautils.get_c4`` (the training windows), transcribed (``>`` as the draw needs it)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(rows) - 1)
            trainenc = tokenizer(rows[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[:, i:i + seqlen])
    return torch.cat(out, dim=0)


def test_gptq_c4_windows_tokenize_each_document_with_its_bos(llama_like):
    ours, _ = gptq_doc_windows(DOCS, llama_like, n_windows=12, seqlen=32, seed=0)
    assert torch.equal(ours, _gptq_get_c4(DOCS, llama_like, 12, 0, 32))
    old, _ = gptq_doc_windows(DOCS, llama_like, n_windows=12, seqlen=32, seed=0, special_tokens=False)
    assert not torch.equal(ours, old)  # the BOS shifts the offset draw: the earlier scheme was not GPTQ's


def test_perplexity_stream_starts_with_one_bos_as_gptq(llama_like, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[5] * 4)
    (tmp_path / "b.txt").write_text(DOCS[9] * 4)
    ev = PerplexityEval(name="t", dataset="local", path=str(tmp_path), seqlen=64, max_windows=3)
    ids, _ = ev._tokens(llama_like)
    joined = "\n\n".join([DOCS[5] * 4, DOCS[9] * 4])
    ref = llama_like(joined, return_tensors="pt").input_ids[0]  # GPTQ: testenc = tokenizer("\n\n".join(...))
    assert torch.equal(ids, ref) and int(ids[0]) == llama_like.bos_token_id
    assert (ids == llama_like.bos_token_id).sum() == 1
    none = PerplexityEval(name="t", dataset="local", path=str(tmp_path), seqlen=64, max_windows=3,
                          special_tokens="none")
    ids_none, _ = none._tokens(llama_like)
    assert torch.equal(ids_none, ref[1:])


def test_smoothquant_calibration_takes_the_first_n_after_the_datasets_shuffle(llama_like, tmp_path):
    rows = [f"sample {i} " * (2 + i % 5) for i in range(30)]
    for i, d in enumerate(rows):
        (tmp_path / f"{i:02d}.txt").write_text(d)
    cfg = CalibConfig(source="local", path=str(tmp_path), sampling="documents", order="hf_shuffle", n_samples=8,
                      seqlen=16, seed=42)
    data = build_calib(cfg, llama_like)
    order = np.random.default_rng(42).permutation(30)[:8]
    ref = [llama_like(rows[i], max_length=16, truncation=True)["input_ids"] for i in order]  # get_act_scales
    assert [t.tolist() for t in data.tokens] == ref
    assert data.provenance["order"] == "hf_shuffle"


def test_paper_calibration_presets_compose_to_the_reference_schemes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        awq = compose("config", overrides=["+exp=smoothquant_plus_7b", "quantizer=awq"])
        sq = compose("config", overrides=["+exp=smoothquant_plus_7b", "quantizer=smoothquant"])
    assert (awq.calib.sampling, awq.calib.n_samples, awq.calib.seqlen, awq.calib.seed) == ("awq_blocks", 128, 512, 42)
    assert (sq.calib.sampling, sq.calib.order, sq.calib.n_samples, sq.calib.seqlen) == ("documents", "hf_shuffle",
                                                                                         512, 512)


def test_order_applies_to_documents_only():
    from quantlab.errors import ConfigError

    with pytest.raises(ConfigError, match="calib.order"):
        CalibConfig(source="local", path="stdlib_calib", sampling="chunks", order="hf_shuffle")
