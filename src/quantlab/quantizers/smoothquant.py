"""SmoothQuant W8A8 (Xiao et al. 2023): migrate activation outliers into the weights, then int8 both.

Reference: ``mit-han-lab/smoothquant`` (``smooth.py smooth_lm``, ``fake_quant.py W8A8Linear``).

1. Statistics: per-input-channel max |x| of every scaling group's input over the calibration set
   (:func:`~quantlab.calib.stats.collect_group_absmax`, the reference's ``get_act_scales``; fixed-length
   rows or variable-length sequences, never padded).
2. Smoothing, for the reference's Llama pairs only: ``input_layernorm -> q/k/v`` and
   ``post_attention_layernorm -> gate/up`` (o_proj and down_proj are not smoothed)::

       s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (SmoothQuant eq. 4 = SmoothQuant+ eq. 6)
       Y = (X diag(s)^-1) (W diag(s))^T                (SmoothQuant+ eq. 5: 1/s folded into the norm gain)

   with ``max|W_j|`` over the concatenated rows of the group's Linears and the 1e-5 floors of the
   reference (:mod:`quantlab.algorithms.smoothing`).
3. Weights: int8 per output channel, symmetric absmax (``s = max|w| / 127``), fake-quantized in place.
4. Activations: every quantized Linear is swapped for an
   :class:`~quantlab.nn.act_quant.ActQuantLinear` (still an ``nn.Linear``) whose input is int8
   fake-quantized per token (dynamic), the reference's Llama setting. The attention BMM inputs
   (``quantize_bmm_input``) are not quantized.

This is the W8A8 baseline of the LLM-QAT tables. Artifacts: ``smooth.<block>.<group key>`` (the
folded ``s``) and ``smoothquant.alpha``; ``load_artifacts`` folds the saved ``s`` into a fresh model,
quantizes and swaps again, without calibration, giving the same weights bit for bit.

The helpers :func:`smooth_and_quantize` and :func:`load_saved_scales` are shared with SmoothQuant+.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from quantlab.algorithms.smoothing import fold_group_scales, group_scales
from quantlab.calib.sequential import on_device
from quantlab.calib.stats import collect_group_absmax, group_key
from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight, rtn_linears_
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping, relative_names
from quantlab.nn.act_quant import GRANULARITIES, swap_act_quant
from quantlab.quantizers import artifacts
from quantlab.quantizers.base import BlockwiseQuantizer, CalibratedConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

# (block name, block, groups) -> {group.key: s}
ScalesFn = Callable[[str, nn.Module, list[ScaleGroup]], dict[str, torch.Tensor]]


def _w8_per_channel() -> QuantFormat:
    return QuantFormat(bits=8, group_size=-1, symmetric=True)


def check_alpha(value: object, key: str = "quantizer.alpha") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant settings (defaults: the reference's).

    Attributes:
        format: weight format (reference: int8 per output channel, symmetric absmax).
        alpha: migration strength (reference default 0.5; its README uses 0.85 for Llama-2/3, Mistral).
        act_bits: activation bits (8).
        act_granularity: ``per_token`` (dynamic, the reference's Llama setting) or ``per_tensor`` (dynamic).

    With ``wakv`` (the LLM-QAT tables' SmoothQuant rows) W replaces ``format.bits`` and the W-A-KV
    activation quantizer (per token, Eq. 3) replaces ``act_bits`` / ``act_granularity``.
    """

    format: QuantFormat = field(default_factory=_w8_per_channel)
    alpha: float = 0.5
    act_bits: int = 8
    act_granularity: str = "per_token"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.alpha)
        if not isinstance(self.format, QuantFormat):
            raise ConfigError("quantizer.format", f"must be a weight format, got {self.format!r}")
        if not is_int(self.act_bits) or not 2 <= self.act_bits <= 16:
            raise ConfigError("quantizer.act_bits", f"must be an integer in [2, 16], got {self.act_bits!r}")
        if self.act_granularity not in GRANULARITIES:
            raise ConfigError("quantizer.act_granularity", f"must be one of {GRANULARITIES}, got {self.act_granularity!r}")


# ---------------------------------------------------------------------------------------------
# Shared with SmoothQuant+
# ---------------------------------------------------------------------------------------------

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
                ref_w.update({f"{name}.{r}": block.get_submodule(r).weight.detach().to("cpu", copy=True) for r in rel})
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


# ---------------------------------------------------------------------------------------------
# SmoothQuant
# ---------------------------------------------------------------------------------------------

def norm_groups(mapping: ArchMapping, block: nn.Module) -> list[ScaleGroup]:
    """The reference ``smooth_lm`` pairs: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up."""
    return [g for g in mapping.applicable_groups(block) if g.prev_kind == "norm"]


@register_quantizer("smoothquant", SmoothQuantConfig)
class SmoothQuantQuantizer(BlockwiseQuantizer[SmoothQuantConfig]):
    """SmoothQuant W8A8: smoothing folded into the RMSNorms, int8 weights, int8 per-token activations."""


    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        cfg = self.config
        mapping = get_mapping(model)
        targets = self.block_targets(model, mapping)
        groups_fn = partial(norm_groups, mapping)
        summary: dict = {}
        if cfg.load_artifacts:
            scales_fn, alpha, saved = load_saved_scales(cfg.load_artifacts, self.name, model, mapping, groups_fn)
            warn_format_change(saved, cfg.format, self.name)
            summary["loaded_from"] = str(cfg.load_artifacts)
        else:
            if calib is None:
                raise ConfigError("calib", "smoothquant needs calibration data")
            alpha = float(cfg.alpha)
            stats = collect_group_absmax(model, mapping, calib.tokens, device=ctx.device, batch_size=cfg.batch_size)
            scales_fn = stats_scales(stats, alpha)
        scales, ref_w = smooth_and_quantize(model, mapping, groups_fn, targets, cfg.format, ctx.device, scales_fn,
                                            keep_reference=ctx.keep_reference_weights)
        if cfg.wakv:  # W-A-KV rows: the shared LLM-QAT activation / KV fake quantization follows (Quantizer.apply)
            act_bits, act_gran = self.wakv_setting().a_bits, "per_token (W-A-KV, Eq. 3 MinMax)"
        else:
            swap_act_quant(model, targets, cfg.act_bits, cfg.act_granularity)
            act_bits, act_gran = cfg.act_bits, cfg.act_granularity
        # re-applied runs return the same tensors, so their run directory can be re-applied in turn
        arts = {**scales, "smoothquant.alpha": torch.tensor(alpha, dtype=torch.float64)}
        summary.update({
            "alpha": alpha, "n_layers": len(targets), "weight_format": cfg.format.short_name(),
            "act_bits": act_bits, "act_granularity": act_gran,
            "smoothed_groups": [g.key for g in groups_fn(mapping.blocks(model)[0])],
        })
        log.info("smoothquant: alpha %.2f, W%dA%d (%s activations), %d Linears", alpha, cfg.format.bits,
                 act_bits, act_gran, len(targets))
        return QuantResult(model=model, quantized_layers=targets, artifacts=arts, summary=summary,
                           reference_weights=ref_w)
