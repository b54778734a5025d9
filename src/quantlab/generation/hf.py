"""Batched generation on a Hugging Face causal LM: continuous batching over a shared KV cache.

quantlab runs its own decoding loop around ``model(...)`` instead of ``model.generate`` so that

* up to ``batch_size`` sequences decode together, and a sequence that hits a stop sequence, EOS or
  its token budget leaves the batch and the KV cache at once while the next queued prompt
  (prefilled on its own) takes its slot: the batch stays full, and a batch never waits for its
  longest row (HumanEval completions range from 2 to 512 tokens);
* the KV cache is preallocated and right-aligned per row (:mod:`quantlab.generation.kv_cache`)
  instead of growing by ``torch.cat`` (a copy of the whole cache per step);
* sampling draws every row from its own generator seeded by ``(seed, prompt, sample index)``, so a
  sample does not depend on the batch size, its batch neighbours, or a resumed run;
* decoding is exactly the recorded :class:`DecodingConfig` (no ``repetition_penalty`` or
  ``top_k=50`` inherited from the model's ``generation_config``).

Greedy batched completions equal one-prompt-at-a-time ones: every prompt is prefilled alone, and in
the batch the attention mask (padding columns get zero weight) plus explicit ``position_ids`` give
every row the positions and attention of an unpadded run (tested; ``scripts/bench_generation.py``
counts matches on HumanEval-164 with SmolLM2). Prompts are grouped by stop set and queued longest
first. Temperature, top-k and top-p use transformers' own logits warpers (``generate``'s semantics).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from quantlab.generation.config import DecodingConfig
from quantlab.generation.kv_cache import GrowingLayer, growing_cache
from quantlab.generation.stops import first_stop, truncate_at_stop
from quantlab.generation.types import Completion, GenerationStats, GenRequest
from quantlab.utils.torch_utils import model_device

log = logging.getLogger(__name__)


def special_ids(model: nn.Module, tokenizer: Any) -> tuple[set[int], int]:
    """(EOS ids, pad id): EOS from the model's generation config (may be several), else the tokenizer's."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    return eos_ids, int(pad)


def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """Seed of one row's generator: depends only on the run seed, the prompt and the sample index."""
    digest = hashlib.sha256(f"{seed}|{sample}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _groups(requests: Sequence[GenRequest], lengths: Sequence[int]) -> list[list[int]]:
    """Indices of ``requests`` grouped by stop set, each group longest prompt first (so a row admitted
    later rarely needs the live rows' cache shifted)."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].stop, -lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and requests[out[-1][0]].stop == requests[i].stop:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _warpers(cfg: DecodingConfig) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_k > 0:
        procs.append(TopKLogitsWarper(int(cfg.top_k)))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(float(cfg.top_p)))
    return procs


class _Row:
    """One sequence being generated."""

    __slots__ = ("request", "sample", "prompt", "tokens", "gen", "reason")

    def __init__(self, request: int, sample: int, prompt: list[int], gen: torch.Generator | None) -> None:
        self.request, self.sample, self.prompt, self.gen = request, sample, prompt, gen
        self.tokens: list[int] = []
        self.reason = ""


def _stopped(tokenizer: Any, tokens: list[int], stops: Sequence[str], window: int) -> bool:
    """Does the decoded tail of ``tokens`` contain a stop sequence? (a stop of ``L`` characters spans
    at most ``L`` tokens, so ``window = max L + 2`` tokens suffice; the final cut uses the full text)."""
    return first_stop(tokenizer.decode(tokens[-window:], skip_special_tokens=False), stops) != -1


class _Stream:
    """Continuous batching over one stop group: up to ``slots`` rows decode together; a finished row
    leaves at once and the next queued row (prefilled on its own) takes its slot."""

    def __init__(self, model: nn.Module, tokenizer: Any, stops: tuple[str, ...], cfg: DecodingConfig,
                 eos_ids: set[int], on_row_done: Callable[[_Row], None]) -> None:
        self.model, self.tokenizer, self.stops, self.cfg, self.eos_ids = model, tokenizer, stops, cfg, eos_ids
        self.on_row_done = on_row_done
        self.device = model_device(model)
        self.window = max((len(x) for x in stops), default=0) + 2
        self.warp = _warpers(cfg) if cfg.do_sample else None
        self.n_layers: int = cast(Any, model.config).num_hidden_layers
        self.cache = growing_cache(self.n_layers, 0)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.rows: list[_Row] = []
        self.next_tokens: list[int] = []
        self.steps = 0
        self._prefill_memo: tuple[int, Any, torch.Tensor] | None = None

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        logits = logits.float()
        if self.warp is None:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(self.warp(None, logits), dim=-1)  # type: ignore[arg-type]  # warpers ignore input_ids
        return [int(torch.multinomial(probs[j], 1, generator=r.gen)[0]) for j, r in enumerate(rows)]

    def _push(self, row: _Row, tok: int) -> bool:
        """Append ``tok`` to ``row``; True while the row goes on."""
        row.tokens.append(tok)
        if tok in self.eos_ids:
            row.reason = "eos"
        elif self.stops and _stopped(self.tokenizer, row.tokens, self.stops, self.window):
            row.reason = "stop"
        elif len(row.tokens) >= self.cfg.max_new_tokens:
            row.reason = "length"
        else:
            return True
        self.on_row_done(row)
        return False

    def _prefill(self, row: _Row) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Keys/values and last logits of ``row``'s prompt alone (shared by the samples of one prompt)."""
        if self._prefill_memo is not None and self._prefill_memo[0] == row.request:
            return self._prefill_memo[1], self._prefill_memo[2]
        cache = growing_cache(self.n_layers, len(row.prompt) + self.cfg.max_new_tokens)
        ids = torch.tensor([row.prompt], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = [layer.prompt_kv() for layer in cast(list[GrowingLayer], cache.layers)]
        self._prefill_memo = (row.request, kv, out.logits[:, -1, :])
        return kv, out.logits[:, -1, :]

    def admit(self, row: _Row) -> None:
        """Prefill ``row``, pick its first token and, unless that already ends it, add it to the batch."""
        kv, logits = self._prefill(row)
        tok = self._pick(logits, [row])[0]
        if not self._push(row, tok):
            return
        p, width = len(row.prompt), self.mask.shape[1]
        for layer, (k, v) in zip(cast(list[GrowingLayer], self.cache.layers), kv):
            layer.admit(k, v)
        if p > width:
            self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], p - width)), self.mask], dim=1)
            width = p
        new = self.mask.new_zeros((1, width))
        new[0, width - p :] = 1
        self.mask = torch.cat([self.mask, new], dim=0)
        self.rows.append(row)
        self.next_tokens.append(tok)

    def step(self) -> None:
        """One forward pass for every live row, then drop the rows that finished."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        ids = torch.tensor(self.next_tokens, dtype=torch.long, device=self.device)[:, None]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.mask.sum(-1, keepdim=True) - 1,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.steps += 1
        toks = self._pick(out.logits[:, -1, :], self.rows)
        keep = [j for j, (r, t) in enumerate(zip(self.rows, toks)) if self._push(r, t)]
        if len(keep) < len(self.rows):
            sel = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.cache.batch_select_indices(sel)
            self.mask = self.mask[sel]
            self.rows = [self.rows[j] for j in keep]
            toks = [toks[j] for j in keep]
            live = self.mask.any(dim=0).nonzero()
            lead = int(live[0]) if len(live) else self.mask.shape[1]
            if lead > 0:  # columns that are padding for every live row
                for layer in cast(list[GrowingLayer], self.cache.layers):
                    layer.trim_left(lead)
                self.mask = self.mask[:, lead:]
        self.next_tokens = toks

    @torch.no_grad()
    def run(self, queue: list[_Row], slots: int) -> None:
        pending = list(reversed(queue))
        while pending or self.rows:
            while pending and len(self.rows) < slots:
                self.admit(pending.pop())
            if self.rows:
                self.step()


def hf_generate(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[GenRequest],
    cfg: DecodingConfig,
    stats: GenerationStats,
    progress: Callable[[int], Any] | None = None,
    on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
) -> list[list[Completion]]:
    """Generate ``cfg.n`` completions for every request.

    Args:
        model: a causal LM (stock HF model, possibly with swapped quantized modules).
        tokenizer: its tokenizer (special tokens are added as the tokenizer does by default, unless
            a request says ``add_special_tokens=False``).
        requests: prompts and their stop sequences.
        cfg: decoding settings.
        stats: filled with token counts and batch counts.
        progress: optional callable ``(n_prompts_done) -> None`` called after each batch.
        on_batch: optional callable ``(indices, completions) -> None`` called after each batch
            (callers persist finished prompts there, so an interrupted run can resume).

    Returns:
        ``completions[i]`` = the ``cfg.n`` completions of ``requests[i]``.
    """
    encoded = [list(r.prompt_ids) if r.prompt_ids is not None
               else tokenizer(r.prompt, add_special_tokens=r.add_special_tokens)["input_ids"] for r in requests]
    eos_ids, _ = special_ids(model, tokenizer)
    results: list[list[Completion]] = [[] for _ in requests]
    finished: dict[int, list[_Row]] = {}

    def row_done(row: _Row) -> None:
        finished.setdefault(row.request, []).append(row)
        if len(finished[row.request]) < cfg.n:
            return
        rows = sorted(finished.pop(row.request), key=lambda r: r.sample)
        texts = tokenizer.batch_decode([r.tokens for r in rows], skip_special_tokens=True)
        stop = requests[row.request].stop
        results[row.request] = [
            Completion(text=truncate_at_stop(t, stop), n_tokens=len(r.tokens), finish_reason=r.reason,
                       token_ids=tuple(r.tokens))
            for r, t in zip(rows, texts)
        ]
        stats.generated_tokens += sum(len(r.tokens) for r in rows)
        if on_batch is not None:
            on_batch([row.request], [results[row.request]])
        if progress is not None:
            progress(1)

    was_training = model.training
    model.eval()
    try:
        for group in _groups(requests, [len(e) for e in encoded]):
            queue = []
            for i in group:
                for s in range(cfg.n):
                    gen = None
                    if cfg.do_sample:
                        gen = torch.Generator(device=model_device(model))
                        gen.manual_seed(sample_seed(cfg.seed, requests[i].key, s))
                    queue.append(_Row(i, s, encoded[i], gen))
            stream = _Stream(model, tokenizer, requests[group[0]].stop, cfg, eos_ids, row_done)
            stream.run(queue, slots=cfg.batch_size)
            stats.batches += 1
            stats.extra["decode_steps"] = stats.extra.get("decode_steps", 0) + stream.steps
    finally:
        if was_training:
            model.train()
    return results
