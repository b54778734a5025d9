"""Data-free QAT data: next-token generations of the full-precision teacher (LLM-QAT section 2.1).

Each sequence starts from one vocabulary token, continues greedily (top-1) until it holds ``j``
tokens, ``j`` drawn from ``greedy_prefix`` (the paper: "the first 3~5 tokens"), then samples from the
50 most likely tokens (``top_k``, below) up to ``max_length`` tokens (``strategy=hybrid``).
``greedy`` and ``sample`` are the paper's two ablation arms (Table 5: all greedy / all sampled).

Where the paper and its public code differ (``first_token``):

* ``random`` (paper): the first token is drawn uniformly from the vocabulary, seeded per sequence;
* ``enumerate`` (code, ``generate_data.py``): sequence ``i`` starts from token id ``i // len(prefixes)``
  and takes each greedy-prefix length in turn (the code makes 3 sequences per id: prefixes 3, 4, 5).

Sampling (``top_k``, ``temperature``): the paper samples "from top-k candidates" (Fig. 2) without
giving k; the code calls ``model.generate(do_sample=True)`` with no other sampling setting, so
Hugging Face's ``GenerationConfig`` defaults apply (transformers 4.30.1, its ``requirement.txt``):
``top_k=50``, temperature 1.0, ``top_p=1``.
The defaults here are the same (``top_k=50``, ``temperature=1.0``, no nucleus cut). ``top_k=0``
samples the full softmax (quantlab's default before 2026-12); the method label then says
``data.top_k:0`` (see :meth:`~quantlab.quantizers.llm_qat.LLMQATQuantizer.label`).

Sequences are generated in batches through :func:`quantlab.generation.generate` (continuous
batching, per-sequence seeded sampling) and appended to ``sequences.jsonl`` (one fsynced line per
sequence, with its id, first token and greedy length) in a directory keyed by the teacher and these
settings, so a rerun reuses them and an interrupted run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import ConfigError
from quantlab.generation import DecodingConfig, GenRequest, generate
from quantlab.qat import parallel
from quantlab.utils.checks import is_int
from quantlab.utils.jsonl import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

STRATEGIES = ("hybrid", "greedy", "sample")
FIRST_TOKENS = ("random", "enumerate")
SEQUENCES = "sequences.jsonl"


@dataclass(frozen=True)
class DataGenConfig:
    """Settings of the teacher's generations.

    Attributes:
        n_sequences: sequences to generate.
        max_length: tokens per sequence, the first token included (paper and code: 2048).
        strategy: ``hybrid`` (greedy prefix, then sampled), ``greedy`` or ``sample``.
        greedy_prefix: candidate lengths ``j`` of the greedy prefix, first token included (hybrid).
        first_token: ``random`` (paper) or ``enumerate`` (the public code).
        temperature: softmax temperature of the sampled part (1.0: paper and code).
        top_k: sample from the ``top_k`` most likely tokens (50: the code's Hugging Face default and
            the paper's "top-k candidates"); 0 = the full softmax (not the reference).
        seed: seeds first tokens, prefix lengths and sampling.
        batch_size: sequences decoded together.
        exclude_special: never start from a special token (BOS/EOS/PAD).
    """

    n_sequences: int = 256
    max_length: int = 512
    strategy: str = "hybrid"
    greedy_prefix: tuple[int, ...] = (3, 4, 5)
    first_token: str = "random"
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    batch_size: int = 16
    exclude_special: bool = True

    def __post_init__(self) -> None:
        k = "quantizer.data"
        object.__setattr__(self, "greedy_prefix", tuple(self.greedy_prefix))
        for name in ("n_sequences", "max_length", "batch_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"{k}.{name}", f"must be an integer >= 1, got {v!r}")
        if self.max_length < 2:
            raise ConfigError(f"{k}.max_length", f"must be >= 2 (a first token and a continuation), got {self.max_length}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{k}.strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.first_token not in FIRST_TOKENS:
            raise ConfigError(f"{k}.first_token", f"must be one of {FIRST_TOKENS}, got {self.first_token!r}")
        if not self.greedy_prefix or not all(is_int(j) and 1 <= j <= self.max_length for j in self.greedy_prefix):
            raise ConfigError(f"{k}.greedy_prefix", f"must be lengths in [1, max_length], got {list(self.greedy_prefix)}")
        DecodingConfig(do_sample=True, temperature=self.temperature, top_k=self.top_k, seed=self.seed, key=k)

    def plan(self, index: int, vocab: list[int]) -> tuple[int, int]:
        """``(first token id, greedy length j)`` of sequence ``index`` (deterministic in the seed)."""
        if self.first_token == "enumerate":
            first = vocab[(index // len(self.greedy_prefix)) % len(vocab)]
            j = self.greedy_prefix[index % len(self.greedy_prefix)]
        else:
            h = int.from_bytes(hashlib.sha256(f"{self.seed}|{index}".encode()).digest()[:8], "little")
            first = vocab[h % len(vocab)]
            j = self.greedy_prefix[(h >> 32) % len(self.greedy_prefix)]
        if self.strategy == "greedy":
            j = self.max_length
        elif self.strategy == "sample":
            j = 1
        return first, min(j, self.max_length)


def start_vocab(tokenizer: Any, vocab_size: int, exclude_special: bool) -> list[int]:
    """Token ids a sequence may start from (all of the model's vocabulary, special tokens removed)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if exclude_special else set()
    return [i for i in range(vocab_size) if i not in special]


def _generate_batch(model: nn.Module, tokenizer: Any, cfg: DataGenConfig, plans: list[tuple[int, int, int]]):
    """``plans`` = ``[(index, first, j)]`` -> token lists of ``max_length`` (fewer when EOS comes first)."""
    greedy = [GenRequest(f"qat-data#{i}", prompt_ids=(first,)) for i, first, _ in plans]
    seqs = [[first] for _, first, _ in plans]
    by_len: dict[int, list[int]] = {}
    for k, (_, _, j) in enumerate(plans):
        if j > 1:
            by_len.setdefault(j, []).append(k)
    for j, ks in by_len.items():  # greedy prefix up to j tokens
        dec = DecodingConfig(do_sample=False, max_new_tokens=j - 1, batch_size=cfg.batch_size, backend="hf")
        comps, _ = generate(model, tokenizer, [greedy[k] for k in ks], dec)
        for k, c in zip(ks, comps):
            seqs[k] += list(c[0].token_ids)
    ended = {k for k, (_, _, j) in enumerate(plans) if len(seqs[k]) < j}  # EOS inside the greedy prefix
    todo = [k for k in range(len(plans)) if k not in ended and len(seqs[k]) < cfg.max_length]
    budgets: dict[int, list[int]] = {}
    for k in todo:
        budgets.setdefault(cfg.max_length - len(seqs[k]), []).append(k)
    for budget, ks in budgets.items():
        dec = DecodingConfig(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, max_new_tokens=budget,
                             seed=cfg.seed, batch_size=cfg.batch_size, backend="hf")
        reqs = [GenRequest(f"qat-data#{plans[k][0]}", prompt_ids=tuple(seqs[k])) for k in ks]  # seeded per index
        comps, _ = generate(model, tokenizer, reqs, dec)
        for k, c in zip(ks, comps):
            seqs[k] += list(c[0].token_ids)
    return seqs


def generate_data(model: nn.Module, tokenizer: Any, cfg: DataGenConfig, directory: Path,
                  meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Generate (or load, or complete) ``cfg.n_sequences`` teacher sequences under ``directory``.

    Returns rows ``{"index", "first", "greedy_len", "ids"}`` in index order. A directory holding
    sequences of other settings (its ``meta``) raises instead of mixing them.

    Under torchrun (:mod:`quantlab.qat.parallel`) the batches a single process would decode are dealt
    out to the ranks in turn (batch ``k`` to rank ``k mod W``): a sequence's first token, prefix length
    and sampling generator depend only on its index, and every batch is the one a single process would
    form, so the union is the single-process data. After each round the new rows are gathered on every
    rank; rank 0 alone reads and writes ``directory`` and sends the rows it had cached to the others.
    """
    import json

    directory = Path(directory)
    info = {**asdict(cfg), **(meta or {})}
    info["greedy_prefix"] = list(cfg.greedy_prefix)
    meta_path = directory / "meta.json"
    lead, n_ranks, me = parallel.is_lead(), parallel.world_size(), parallel.rank()
    have: dict[int, dict[str, Any]] = {}
    error = None
    if lead:
        directory.mkdir(parents=True, exist_ok=True)
        if meta_path.exists() and json.loads(meta_path.read_text()) != info:
            error = f"{directory} holds sequences of other settings; use another directory"
        else:
            meta_path.write_text(json.dumps(info, indent=2))
            have = {r["index"]: r for r in read_jsonl(directory / SEQUENCES) if "index" in r and "ids" in r}
    error, todo = parallel.broadcast_object((error, [i for i in range(cfg.n_sequences) if i not in have]))
    if error:
        raise ConfigError("quantizer.data", error)
    vocab = start_vocab(tokenizer, cast(Any, model.config).vocab_size, cfg.exclude_special)
    if have:
        log.info("QAT data: %d of %d sequences already in %s", len(have), cfg.n_sequences, directory)
    bar = tqdm(total=cfg.n_sequences, initial=cfg.n_sequences - len(todo), desc="QAT data", unit="seq",
               leave=False, disable=not lead)
    chunks = [todo[start:start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    try:
        for first_chunk in range(0, len(chunks), n_ranks):  # one chunk per rank and round
            mine = chunks[first_chunk + me] if first_chunk + me < len(chunks) else []
            rows = []
            if mine:
                plans = [(i, *cfg.plan(i, vocab)) for i in mine]
                seqs = _generate_batch(model, tokenizer, cfg, plans)
                rows = [{"index": i, "first": first, "greedy_len": j, "ids": s}
                        for (i, first, j), s in zip(plans, seqs)]
            rows = [r for part in parallel.gather_objects(rows) for r in part]  # rank order = chunk order
            if lead:
                append_jsonl(directory / SEQUENCES, rows)
            have.update({r["index"]: r for r in rows})
            bar.update(len(rows))
    finally:
        bar.close()
    if n_ranks > 1:  # the rows rank 0 found cached
        new = set(todo)
        cached = {i: r for i, r in have.items() if i not in new} if lead else None
        have.update(parallel.broadcast_object(cached))
    return [have[i] for i in range(cfg.n_sequences)]
