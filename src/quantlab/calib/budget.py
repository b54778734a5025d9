"""How many calibration tokens go through a decoder block at once: a memory budget, not a constant.

The calibration engine keeps a few whole *streams* (the hidden states of every calibration token at
one point: the block's inputs and outputs, and whatever a method caches); those grow with the
calibration set and are what the method needs. On top of them, one forward over a chunk of tokens
needs *transient* activations (q/k/v, the MLP's intermediate products, ...) proportional to the
chunk. Sending the whole set through a layer at once makes those transients several times the size
of a stream (for SmolLM2-135M with 32 x 256 tokens: ~200 MB of MLP intermediates at once, 0.4x the
model's fp32 bytes), so the default chunk is chosen from a budget instead:

    tokens per chunk = budget / activation_bytes_per_token,  budget = max(model bytes / 16, 32 MiB)

clamped to [one sequence, 16384 tokens]. For SmolLM2-135M (fp32, 538 MB, seqlen 256) that is 1024
tokens (4 sequences); for a 7B model in fp16 at seqlen 2048 about 7000 tokens (3 sequences). The
number of forwards per layer does not change (each chunk is one forward; methods that must change a
block between its Linears use :func:`~quantlab.calib.lockstep.lockstep_forward` to keep that
property). An explicit ``quantizer.batch_size`` (sequences per chunk) overrides the budget; it is an
execution setting (sums are reordered, nothing else).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHUNK_MEMORY_FRACTION = 1 / 16  # transient activations of one chunk, as a fraction of the model's bytes
MIN_CHUNK_BYTES = 32 * 2**20  # ... but never below this (tiny models: one chunk)
MAX_CHUNK_TOKENS = 16384  # ... and never above this many tokens


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once; offloaded ones included)."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def activation_bytes_per_token(config: Any, seqlen: int, dtype: torch.dtype) -> int:
    """Estimated transient bytes per token of one decoder-block forward.

    ``6 x hidden`` (normed input, q/k/v and their rotated copies, attention output, o_proj output)
    plus ``3 x intermediate`` (gate, up and their product alive together in a gated MLP), in the
    model's dtype; with eager attention also the ``heads x seqlen`` scores and probabilities (fp32).
    Fields missing from ``config`` fall back to hidden 4096 and intermediate 4 x hidden.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    hidden = int(getattr(config, "hidden_size", 0) or 4096)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    per = elem * (6 * hidden + 3 * inter)
    if getattr(config, "_attn_implementation", None) == "eager":
        per += 2 * 4 * int(getattr(config, "num_attention_heads", 0) or 32) * seqlen
    return per


def chunk_tokens(model: nn.Module, seqlen: int) -> int:
    """Default tokens per calibration forward for ``model`` at sequence length ``seqlen`` (module docstring)."""
    budget = max(model_bytes(model) * CHUNK_MEMORY_FRACTION, MIN_CHUNK_BYTES)
    per = activation_bytes_per_token(getattr(model, "config", None), seqlen, _dtype(model))
    return int(max(seqlen, min(MAX_CHUNK_TOKENS, budget // per)))


def streams_that_fit(model: nn.Module, stream_bytes: int) -> int:
    """How many extra activation streams of ``stream_bytes`` each fit the same budget as one chunk's
    transients (at least 1): e.g. SmoothQuant+'s candidate streams per wave (``alpha_batch: null``)."""
    budget = max(model_bytes(model) * CHUNK_MEMORY_FRACTION, MIN_CHUNK_BYTES)
    return int(max(1, budget // max(stream_bytes, 1)))
