"""Activation statistics gathered with the calibration engine (full-precision model, no propagation of errors).

``collect_group_absmax`` returns, for every scaling group of every block, the per-input-channel
maximum of |x| over all calibration tokens at the group's shared input (SmoothQuant
``calibration.py get_act_scales``; SmoothQuant+ section 3.4: "the maximum activation values by
channel"). Statistics are kept in float32 (float64 for float64 models) on CPU. Variable-length
calibration data (``calib.sampling=documents``) is chunked by the engine into unpadded equal-length
batches, so the maximum runs over exactly the real tokens of every sequence.
"""
from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from quantlab.calib.sequential import BlockContext, Tokens, run_sequential
from quantlab.models.mappings import ArchMapping, ScaleGroup


def group_key(block_name: str, group: ScaleGroup) -> str:
    """Model-level key of a group, e.g. ``model.layers.0.input_layernorm->q_proj,k_proj,v_proj``."""
    return f"{block_name}.{group.key}"


def reduce_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel max |x| over every leading dimension of ``x`` (..., channels)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).to(dt)


@torch.no_grad()
def collect_group_absmax(
    model: nn.Module,
    mapping: ArchMapping,
    tokens: Tokens,
    *,
    device: torch.device,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``group_key -> max|x|`` (in,) for every applicable scaling group of every block (CPU tensors).

    The input of a group is observed at its first Linear (all Linears of a group share it).
    """
    stats: dict[str, torch.Tensor] = {}

    def per_block(ctx: BlockContext) -> list[torch.Tensor]:
        groups = {g.linears[0]: g for g in mapping.applicable_groups(ctx.block)}

        def on_input(name: str, x: torch.Tensor, _kw: dict[str, Any], _chunk: int) -> None:
            key = group_key(ctx.name, groups[name])
            m = reduce_absmax(x).cpu()
            stats[key] = m if key not in stats else torch.maximum(stats[key], m)

        # one pass: statistics and the block's (unmodified, full-precision) outputs for the next block
        return cast(list[torch.Tensor], ctx.collect(list(groups), on_input, early_exit=False))  # never None

    run_sequential(model, mapping, tokens, per_block, device=device, batch_size=batch_size, propagate="quantized",
                   desc="activation absmax", writeback=False)
    return stats
