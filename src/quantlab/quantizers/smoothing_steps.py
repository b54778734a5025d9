"""The smoothing steps SmoothQuant and SmoothQuant+ share: eq. (6) scales from activation statistics,
the per-block fold (eq. 5) followed by RTN of the block's targets, and the re-application of saved scales.

The math lives in :mod:`quantlab.algorithms.smoothing`; this module orders it over the model's blocks
on the calibration engine's devices (:func:`~quantlab.calib.sequential.on_device`). Each method's own
file (:mod:`quantlab.quantizers.smoothquant`, :mod:`quantlab.quantizers.smoothquant_plus`) decides
which groups, which alpha and what follows (activation quantization, the alpha search).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantlab.algorithms.smoothing import fold_group_scales, group_scales
from quantlab.calib.sequential import on_device
from quantlab.calib.stats import group_key
from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight, rtn_linears_
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, relative_names
from quantlab.quantizers import artifacts
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)

# (block name, block, groups) -> {group.key: s}
ScalesFn = Callable[[str, nn.Module, list[ScaleGroup]], dict[str, torch.Tensor]]


def check_alpha(value: object, key: str = "quantizer.alpha") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"must be a number in [0, 1], got {value!r}")


def stats_scales(stats: dict[str, torch.Tensor], alpha: float) -> ScalesFn:
    """Eq. (6) scales from the fp model's activation maxima and the block's current (original) weights."""

    def fn(name: str, block: nn.Module, groups: list[ScaleGroup]) -> dict[str, torch.Tensor]:
        return group_scales(block, groups, {g.key: stats[group_key(name, g)] for g in groups}, alpha)

    return fn


@torch.no_grad()
def smooth_and_quantize(
    model: nn.Module, mapping: ArchMapping, groups_fn: Callable[[nn.Module], list[ScaleGroup]],
    targets: list[str], fmt: QuantFormat, device: torch.device, scales_fn: ScalesFn, keep_reference: bool = False,
    codes: dict[str, QuantizedWeight] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Fold eq. (5) with ``scales_fn``'s ``s`` into every block, then RTN-quantize the block's targets.

    Returns:
        ``(scales, reference_weights)``: ``smooth.<block>.<group key> -> s`` (CPU) and, with
        ``keep_reference``, the smoothed full-precision weights of the targets (CPU, before rounding).
        With ``codes``, every target's integer codes are stored there (:func:`rtn_linears_`).
    """
    scales_out: dict[str, torch.Tensor] = {}
    ref_w: dict[str, torch.Tensor] | None = {} if keep_reference else None
    for i, block in enumerate(mapping.blocks(model)):
        name = mapping.block_name(i)
        groups = groups_fn(block)
        rel = relative_names(targets, name)
        with on_device([block], device):
            scales = scales_fn(name, block, groups)
            fold_group_scales(block, groups, scales)
            if ref_w is not None:
                ref_w.update({f"{name}.{r}": get_linear(block, r).weight.detach().to("cpu", copy=True) for r in rel})
            rtn_linears_(block, rel, fmt, codes, prefix=f"{name}.")
        scales_out.update({f"smooth.{group_key(name, g)}": scales[g.key].detach().cpu() for g in groups})
    return scales_out, ref_w


def load_saved_scales(source: str | Path, method: str, model: nn.Module, mapping: ArchMapping,
                      groups_fn: Callable[[nn.Module], list[ScaleGroup]]) -> tuple[ScalesFn, float, dict]:
    """Read ``method``'s artifact file; returns ``(scales_fn, alpha, saved_config)``.

    Every ``smooth.*`` entry of the file must be used by this model and group selection, and every
    group must have one, so a file made for another model or another group choice (e.g. SmoothQuant+
    ``smooth_vo``) is refused (:class:`ConfigError` on ``quantizer.load_artifacts``).
    """
    tensors, saved = artifacts.load_artifacts(source, method)
    wanted = {f"smooth.{group_key(mapping.block_name(i), g)}" for i, b in enumerate(mapping.blocks(model)) for g in groups_fn(b)}
    extra = sorted(k for k in tensors if k.startswith("smooth.") and k not in wanted)
    if extra:
        raise ConfigError(artifacts.KEY, f"{source} smooths groups this run does not ({extra[:3]}): "
                                         "another model, or another group selection (smooth_vo?)")
    alpha = float(artifacts.require(tensors, f"{method}.alpha", source))

    def fn(name: str, _block: nn.Module, groups: list[ScaleGroup]) -> dict[str, torch.Tensor]:
        return {g.key: artifacts.require(tensors, f"smooth.{group_key(name, g)}", source) for g in groups}

    return fn, alpha, saved


def warn_format_change(saved: dict, fmt: QuantFormat, method: str) -> None:
    """Log a warning when re-applying scales with another weight format than the run that found them."""
    if saved.get("format") not in (None, fmt.to_dict()):
        log.warning("%s: re-applying scales found for format %s with format %s", method, saved["format"], fmt.to_dict())
