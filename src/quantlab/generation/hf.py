"""Batched generation on a Hugging Face causal LM: left padding, KV cache, rows leave as they finish.

quantlab runs its own decoding loop around ``model(...)`` instead of ``model.generate`` so that

* a row that hits a stop sequence, EOS or its token budget is removed from the batch and from the
  KV cache at once (``Cache.batch_select_indices``): a batch costs the sum of its rows' lengths,
  not ``batch size x`` its longest row (HumanEval completions range from 3 to 512 tokens);
* sampling draws every row from its own generator seeded by ``(seed, prompt, sample index)``, so a
  sample does not depend on the batch size, the batch it landed in, or a resumed run;
* decoding is exactly the recorded :class:`DecodingConfig` (no ``repetition_penalty`` or
  ``top_k=50`` inherited from the model's ``generation_config``).

Greedy batched completions equal one-prompt-at-a-time ones: left padding + the attention mask +
explicit ``position_ids`` give every row the positions and attention of an unpadded run (tested; the
bench script counts matches on HumanEval-164 with SmolLM2). Prompts are grouped by stop set and
sorted by token length (longest first) before batching, so batches carry little padding.
Temperature, top-k and top-p use transformers' own logits warpers (same semantics as ``generate``).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from quantlab.generation.config import DecodingConfig
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


def _batches(requests: Sequence[GenRequest], lengths: Sequence[int], per_batch: int) -> list[list[int]]:
    """Indices of ``requests`` grouped by stop set, longest prompt first, ``per_batch`` per batch."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i].stop, -lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < per_batch and requests[out[-1][0]].stop == requests[i].stop:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _left_pad(ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


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

    __slots__ = ("request", "sample", "tokens", "gen", "reason")

    def __init__(self, request: int, sample: int, gen: torch.Generator | None) -> None:
        self.request, self.sample, self.gen = request, sample, gen
        self.tokens: list[int] = []
        self.reason = ""


def _stopped(tokenizer: Any, tokens: list[int], stops: Sequence[str], window: int) -> bool:
    """Does the decoded tail of ``tokens`` contain a stop sequence? (a stop of ``L`` characters spans
    at most ``L`` tokens, so ``window = max L + 2`` tokens suffice; the final cut uses the full text)."""
    return first_stop(tokenizer.decode(tokens[-window:], skip_special_tokens=False), stops) != -1


@torch.no_grad()
def _decode_batch(
    model: nn.Module, tokenizer: Any, prompts: list[list[int]], rows: list[_Row], stops: tuple[str, ...],
    cfg: DecodingConfig, eos_ids: set[int], pad_id: int,
) -> None:
    """Generate into ``rows`` (``prompts[i]`` is the prompt of ``rows[i]``) until every row is done."""
    device = model_device(model)
    ids, mask = _left_pad(prompts, pad_id, device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    warp = _warpers(cfg) if cfg.do_sample else None
    window = max((len(s) for s in stops), default=0) + 2
    active = list(range(len(rows)))
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    for _step in range(cfg.max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if warp is None:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(warp(None, logits), dim=-1)
            nxt = torch.stack([torch.multinomial(probs[j], 1, generator=rows[r].gen)[0] for j, r in enumerate(active)])
        keep = []
        for j, r in enumerate(active):
            row, tok = rows[r], int(nxt[j])
            row.tokens.append(tok)
            if tok in eos_ids:
                row.reason = "eos"
            elif stops and _stopped(tokenizer, row.tokens, stops, window):
                row.reason = "stop"
            elif len(row.tokens) >= cfg.max_new_tokens:
                row.reason = "length"
            else:
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, nxt = mask[sel], nxt[sel]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)


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
    encoded = [tokenizer(r.prompt, add_special_tokens=r.add_special_tokens)["input_ids"] for r in requests]
    eos_ids, pad_id = special_ids(model, tokenizer)
    results: list[list[Completion]] = [[] for _ in requests]
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(requests, [len(e) for e in encoded], cfg.prompts_per_batch):
            rows, prompts = [], []
            for i in idx:
                for s in range(cfg.n):
                    gen = None
                    if cfg.do_sample:
                        gen = torch.Generator(device=model_device(model))
                        gen.manual_seed(sample_seed(cfg.seed, requests[i].prompt, s))
                    rows.append(_Row(i, s, gen))
                    prompts.append(encoded[i])
            _decode_batch(model, tokenizer, prompts, rows, requests[idx[0]].stop, cfg, eos_ids, pad_id)
            texts = tokenizer.batch_decode([r.tokens for r in rows], skip_special_tokens=True)
            for row, text in zip(rows, texts):
                cut = truncate_at_stop(text, requests[row.request].stop)
                results[row.request].append(Completion(text=cut, n_tokens=len(row.tokens), finish_reason=row.reason))
                stats.generated_tokens += len(row.tokens)
            stats.batches += 1
            if on_batch is not None:
                on_batch(idx, [results[i] for i in idx])
            if progress is not None:
                progress(len(idx))
    finally:
        if was_training:
            model.train()
    return results
