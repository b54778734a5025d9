"""One entry point for generation: :func:`generate` picks the backend and measures throughput."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import ConfigError
from quantlab.generation.config import DecodingConfig
from quantlab.generation.hf import hf_generate
from quantlab.generation.types import Completion, GenerationStats, GenRequest
from quantlab.generation.vllm_backend import exportable, vllm_available, vllm_generate

log = logging.getLogger(__name__)


def choose_backend(model: nn.Module, cfg: DecodingConfig) -> str:
    """``hf`` or ``vllm`` for ``cfg.backend`` (``auto``: vLLM only when usable for this model)."""
    if cfg.backend == "hf":
        return "hf"
    usable = vllm_available(model)
    if cfg.tp_size() > 1 and not (usable and not exportable(model)):
        raise ConfigError(f"{cfg.key}.tensor_parallel_size", f"{cfg.tp_size()} GPUs per model needs the vLLM "
                                                             "backend: vllm installed and an exportable model on CUDA")
    if cfg.backend == "vllm":
        if not usable:
            raise ConfigError(f"{cfg.key}.backend", "vllm needs `pip install vllm` and the model on a CUDA device")
        return "vllm"
    if usable and not exportable(model):
        return "vllm"
    return "hf"


def generate(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[GenRequest],
    cfg: DecodingConfig,
    desc: str | None = None,
    on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
) -> tuple[list[list[Completion]], GenerationStats]:
    """Generate ``cfg.n`` completions for each request.

    Args:
        model: causal LM; never modified (eval mode is restored to what it was).
        tokenizer: its tokenizer.
        requests: prompts with their stop sequences.
        cfg: decoding settings.
        desc: label of the progress bar (none when ``None``).
        on_batch: called with ``(request indices, their completions)`` after every HF batch.

    Returns:
        ``(completions, stats)`` where ``completions[i]`` belongs to ``requests[i]``.
    """
    backend = choose_backend(model, cfg)
    stats = GenerationStats(backend=backend, n_prompts=len(requests))
    if not requests:
        return [], stats
    t0 = time.perf_counter()
    if backend == "vllm":
        out = vllm_generate(model, tokenizer, requests, cfg, stats)
        if on_batch is not None:
            on_batch(list(range(len(requests))), out)
    else:
        bar = tqdm(total=len(requests), desc=desc, unit="prompt", disable=desc is None, leave=False)
        try:
            out = hf_generate(model, tokenizer, requests, cfg, stats, progress=bar.update, on_batch=on_batch)
        finally:
            bar.close()
    stats.wall_s = time.perf_counter() - t0
    stats.n_completions = sum(len(c) for c in out)
    log.info(
        "generated %d completions for %d prompts with %s in %.1fs (%.1f tokens/s)",
        stats.n_completions, len(requests), backend, stats.wall_s, stats.tokens_per_s,
    )
    return out, stats
