"""Selecting the Linear layers a quantizer acts on, by fully-qualified module name."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from typing import cast

import torch
from torch import nn


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` matches any glob pattern (``fnmatch``; ``*`` spans dots)."""
    return any(fnmatchcase(name, p) for p in patterns)


def iter_linears(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ("lm_head",)
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(fqn, module)`` for every ``nn.Linear`` whose name matches ``include`` and not ``exclude``.

    Patterns are globs on the fully-qualified name, e.g. ``model.layers.*.mlp.*`` or ``*q_proj``.
    """
    include, exclude = tuple(include), tuple(exclude)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and matches(name, include) and not matches(name, exclude):
            yield name, mod


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at ``fqn`` for ``new`` on a stock model; returns the old module."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The weight a Linear actually multiplies with, as a dense (out, in) tensor: ``mod.weight`` for a
    stock or fake-quantized Linear; the weight fake quantizer's output for a QAT Linear (whose
    ``weight`` is the latent full-precision Parameter); dequantized for bitsandbytes layers (4-bit: the
    codebook values times their block absmax; LLM.int8: int8 codes times row absmax / 127)."""
    quant_weight = getattr(mod, "quantized_weight", None)
    if quant_weight is not None:
        return quant_weight()
    qs = getattr(mod.weight, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("bitsandbytes repacked this layer for its AVX512-BF16 CPU kernel (bf16 absmax): its "
                         "stored weights cannot be recovered exactly; run with quantizer.cpu_bf16_kernel=false")
    if qs is not None:
        from bitsandbytes import functional as F

        return F.dequantize_4bit(cast(torch.Tensor, mod.weight).data, qs)
    scb = getattr(mod.weight, "SCB", None)
    if mod.weight.dtype == torch.int8 and scb is not None:
        return mod.weight.data.float() * (scb.float()[:, None] / 127)
    return cast(torch.Tensor, mod.weight)
