"""vLLM backend: used when ``vllm`` is installed and the model sits on a CUDA device.

vLLM cannot take an in-memory model (vllm#4843): the model is exported to a temporary HF folder
(``save_pretrained`` + tokenizer) and served from there. Only models whose quantized layers are
plain ``nn.Linear`` with rounded ("fake-quantized") weights can be exported this way: their weights
*are* the quantized values, so vLLM serves the same function in the model's dtype. Methods that
swap in modules with extra behaviour (SmoothQuant's activation quantization, QAT wrappers) are
refused with a clear error; use ``backend=hf`` for them. A packed model (``deploy.pack``, or a checkpoint
loaded from an export) is written as a compressed-tensors checkpoint (:mod:`quantlab.deploy.export`), which
vLLM serves through its Marlin W4A16 kernels: the production path.

This path cannot be exercised on machines without a GPU and vLLM (the CI machines): it is kept
small, and the HF backend is the reference the tests check.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from quantlab.errors import ConfigError
from quantlab.generation.config import DecodingConfig
from quantlab.generation.types import Completion, GenerationStats, GenRequest

log = logging.getLogger(__name__)


def vllm_available(model: nn.Module) -> bool:
    """True when vllm is importable and ``model`` is on a CUDA device."""
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        return False
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


def exportable(model: nn.Module) -> list[str]:
    """Names of modules vLLM cannot reproduce from a plain checkpoint (empty = exportable)."""
    bad = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear:
            bad.append(f"{name} ({type(mod).__name__})")
    return bad


def _save_for_vllm(model: nn.Module, tokenizer: Any, folder: str) -> None:
    """A plain checkpoint, or for a packed model a compressed-tensors one (vLLM's native W4A16 format)."""
    from quantlab.nn.packed import packed_modules

    packed = packed_modules(model)
    if not packed:
        cast(Any, model).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        return
    from pathlib import Path

    from quantlab.deploy.export import write_checkpoint

    out = Path(folder) / "ckpt"
    write_checkpoint(model, tokenizer, {n: m.quantized() for n, m in packed}, out, "compressed-tensors")
    for f in out.iterdir():
        f.rename(Path(folder) / f.name)


def vllm_generate(
    model: nn.Module, tokenizer: Any, requests: Sequence[GenRequest], cfg: DecodingConfig, stats: GenerationStats
) -> list[list[Completion]]:
    """Export ``model`` and generate with ``vllm.LLM`` (same decoding settings as the HF path)."""
    bad = exportable(model)
    if bad:
        raise ConfigError(
            f"{cfg.key}.backend",
            f"vLLM serves checkpoints from disk and cannot reproduce swapped modules {bad[:3]}...; use backend=hf",
        )
    from vllm import LLM, SamplingParams

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    results: list[list[Completion]] = [[] for _ in requests]
    with tempfile.TemporaryDirectory(prefix="quantlab-vllm-") as tmp:
        _save_for_vllm(model, tokenizer, tmp)
        llm = LLM(model=tmp, dtype=dtype, seed=cfg.seed, enforce_eager=False, tensor_parallel_size=cfg.tp_size())
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.stop, []).append(i)
        for stop, idx in groups.items():
            params = SamplingParams(
                n=cfg.n,
                temperature=float(cfg.temperature) if cfg.do_sample else 0.0,
                top_k=int(cfg.top_k) if cfg.do_sample and cfg.top_k > 0 else -1,
                top_p=float(cfg.top_p) if cfg.do_sample else 1.0,
                max_tokens=cfg.max_new_tokens,
                stop=list(stop),
                seed=cfg.seed,
            )
            prompts = [{"prompt_token_ids": list(cast(tuple[int, ...], requests[i].prompt_ids))}
                       if requests[i].prompt_ids is not None else requests[i].prompt for i in idx]
            outs = llm.generate(prompts, params)
            for i, o in zip(idx, outs):
                comps = []
                for c in o.outputs:
                    reason = "stop" if c.finish_reason == "stop" and c.stop_reason is not None else (
                        "eos" if c.finish_reason == "stop" else "length"
                    )
                    comps.append(Completion(text=c.text, n_tokens=len(c.token_ids), finish_reason=reason,
                                           token_ids=tuple(c.token_ids)))
                    stats.generated_tokens += len(c.token_ids)
                results[i] = comps
            stats.batches += 1
        import vllm

        stats.extra["vllm_version"] = getattr(vllm, "__version__", "unknown")
        del llm
    return results
