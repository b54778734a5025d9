"""Pieces shared by the smoothing methods (SmoothQuant, SmoothQuant+): re-applying saved scales, the alpha plot."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.algorithms.smoothing import fold_group_scales
from quantlab.calib.sequential import on_device
from quantlab.errors import ConfigError
from quantlab.models.mappings import ArchMapping, ScaleGroup
from quantlab.quantizers import artifacts
from quantlab.types import QuantResult

log = logging.getLogger(__name__)


def reapply_smoothing(
    quantizer: Any,
    model: nn.Module,
    mapping: ArchMapping,
    targets: set[str],
    groups_fn: Callable[[nn.Module], list[ScaleGroup]],
    quantize_block: Callable[[nn.Module, list[str], Any], None],
    device: torch.device | None = None,
) -> QuantResult:
    """Fold the saved ``smooth.<block>.<group>`` scales into a fresh model and quantize it (no calibration).

    Reproduces the original run's weights bit for bit: the same scales are folded with the same
    arithmetic and rounded with the same format.
    """
    src = quantizer.config.load_artifacts
    tensors, _saved = artifacts.load_artifacts(src, quantizer.name)
    outside = sorted(t for t in targets if not t.startswith(mapping.layers + "."))
    if outside:
        raise ConfigError("quantizer.include", f"{quantizer.name} covers decoder-block Linears only; got {outside[:5]}")
    for i, block in enumerate(mapping.blocks(model)):
        name = mapping.block_name(i)
        groups = groups_fn(block)
        scales = {g.key: artifacts.require(tensors, f"smooth.{name}.{g.key}", src) for g in groups}
        dev = device if device is not None else next(block.parameters()).device
        with on_device([block], dev):
            fold_group_scales(block, groups, scales)
            rel_t = [n[len(name) + 1:] for n in sorted(targets) if n.startswith(name + ".")]
            quantize_block(block, rel_t, quantizer.config.format)
    alpha_key = f"{quantizer.name}.alpha"
    alpha = float(artifacts.require(tensors, alpha_key, src))
    log.info("%s: re-applied smoothing (alpha %.2f) from %s", quantizer.name, alpha, src)
    return QuantResult(model=model, quantized_layers=sorted(targets),
                       summary={"alpha": alpha, "loaded_from": str(src), "n_layers": len(targets)})


def alpha_plot(rows: list[dict[str, Any]], path: Path, loss_name: str) -> Path:
    """Plot loss vs alpha with the chosen alpha marked; returns ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r["alpha"] for r in rows]
    v = [r["loss"] for r in rows]
    best = next(r for r in rows if r["chosen"])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(a, v, marker="o", ms=3)
    ax.axvline(best["alpha"], color="tab:red", ls="--", lw=1)
    ax.set_xlabel("alpha (smoothing strength)")
    ax.set_ylabel(f"whole-model loss ({loss_name})")
    ax.set_yscale("log")
    ax.set_title(f"SmoothQuant+ alpha search: best {best['alpha']:.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
