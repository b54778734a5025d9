"""Calibration chunks: which calibration sequences go through a block in one forward.

See :mod:`quantlab.calib.sequential` (module docstring, "Chunks") for the rules and
:mod:`quantlab.calib.budget` for the default size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

from quantlab.calib.budget import MAX_CHUNK_TOKENS, chunk_tokens

# calibration token ids: an int64 (n, seqlen) tensor, or a sequence of 1-D int64 tensors (variable lengths)
Tokens = Union[torch.Tensor, Sequence[torch.Tensor]]


def auto_batch_size(n_samples: int, seqlen: int, batch_size: int | None = None,
                    max_tokens: int = MAX_CHUNK_TOKENS) -> int:
    """Samples per forward chunk: ``batch_size`` if given, else as many as fit in ``max_tokens``."""
    if batch_size is not None and batch_size > 0:
        return min(batch_size, max(n_samples, 1))
    return max(1, min(n_samples, max_tokens // max(seqlen, 1)))


@dataclass(frozen=True)
class Chunk:
    """The calibration sequences of one forward: all of one length, no padding.

    Attributes:
        index: int64 (batch,) positions of the sequences in the calibration set, ascending.
        tokens: int64 (batch, length) token ids.
    """

    index: torch.Tensor
    tokens: torch.Tensor


def plan_chunks(tokens: Tokens, batch_size: int | None = None, max_tokens: int = MAX_CHUNK_TOKENS) -> list[Chunk]:
    """Cut calibration tokens into forward chunks (deterministic; see the module docstring).

    A (n, seqlen) tensor gives ``tokens.split(bs)`` with ``bs = auto_batch_size(n, seqlen, batch_size,
    max_tokens)``.
    A sequence of 1-D tensors is grouped by length, longest first; each group (source order) is split
    the same way with its own length, so sequences that all have one length give exactly the tensor's
    chunks.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"calibration tokens must be (n, seqlen), got shape {tuple(tokens.shape)}")
        n, t = tokens.shape
        bs = auto_batch_size(n, t, batch_size, max_tokens)
        return [Chunk(i, x) for i, x in zip(torch.arange(n).split(bs), tokens.split(bs))]
    seqs = list(tokens)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"calibration sequence {i} is not a non-empty 1-D tensor")
        by_len.setdefault(s.numel(), []).append(i)
    chunks = []
    for length in sorted(by_len, reverse=True):
        idx = by_len[length]
        bs = auto_batch_size(len(idx), length, batch_size, max_tokens)
        for j in range(0, len(idx), bs):
            part = idx[j : j + bs]
            chunks.append(Chunk(torch.tensor(part, dtype=torch.int64), torch.stack([seqs[i] for i in part])))
    return chunks


def model_plan(model: nn.Module, tokens: Tokens, batch_size: int | None = None) -> list[Chunk]:
    """:func:`plan_chunks` with the model's activation budget (:func:`~quantlab.calib.budget.chunk_tokens`
    at the longest sequence length) when ``batch_size`` is automatic."""
    if batch_size is not None and batch_size > 0:
        return plan_chunks(tokens, batch_size)
    longest = tokens.shape[-1] if isinstance(tokens, torch.Tensor) else max((len(t) for t in tokens), default=1)
    return plan_chunks(tokens, None, chunk_tokens(model, int(longest)))


def first_sequences(chunks: Sequence[Chunk], n: int) -> list[Chunk]:
    """``chunks`` limited to the calibration sequences ``0 .. n-1`` (empty chunks dropped).

    Positions inside a chunk are ascending, so each kept part is a prefix of its chunk: row ``r`` of
    a kept chunk is row ``r`` of the same chunk of the full plan.
    """
    out = []
    for c in chunks:
        k = int((c.index < n).sum())
        if k:
            out.append(Chunk(c.index[:k], c.tokens[:k]))
    return out


def describe_chunks(chunks: Sequence[Chunk]) -> str:
    """``"3 chunks, 10 sequences, 1234 tokens, lengths 7..512"`` for log lines."""
    lens = [c.tokens.shape[1] for c in chunks]
    n_seq = sum(c.tokens.shape[0] for c in chunks)
    n_tok = sum(c.tokens.numel() for c in chunks)
    span = f"{min(lens)}..{max(lens)}" if lens and min(lens) != max(lens) else str(lens[0] if lens else 0)
    return f"{len(chunks)} chunks, {n_seq} sequences, {n_tok} tokens, lengths {span}"
