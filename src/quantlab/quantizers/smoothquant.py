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
4. Activations: every quantized Linear is swapped for a :class:`~quantlab.nn.qat.QATLinear` (still an
   ``nn.Linear``, weights untouched) whose input is int8 fake-quantized per token (dynamic, the
   reference's ``s = max(max|x|, 1e-5) / 127``: ``arith="smoothquant"``), the reference's Llama setting. The attention BMM inputs
   (``quantize_bmm_input``) are not quantized.

This is the W8A8 baseline of the LLM-QAT tables. Artifacts: ``smooth.<block>.<group key>`` (the
folded ``s``) and ``smoothquant.alpha``; ``load_artifacts`` folds the saved ``s`` into a fresh model,
quantizes and swaps again, without calibration, giving the same weights bit for bit.

The steps shared with SmoothQuant+ (scales, fold + RTN, re-application) are in
:mod:`quantlab.quantizers.smoothing_steps`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from quantlab.calib.stats import collect_group_absmax
from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.formats.wakv import WAKV
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping
from quantlab.nn.qat import GRANULARITIES, swap_act_quant
from quantlab.quantizers.base import BlockwiseQuantizer, CalibratedConfig, register_quantizer
from quantlab.quantizers.smoothing_steps import (
    check_alpha,
    load_saved_scales,
    smooth_and_quantize,
    stats_scales,
    warn_format_change,
)
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

def _w8_per_channel() -> QuantFormat:
    return QuantFormat(bits=8, group_size=-1, symmetric=True)


@dataclass(frozen=True)
class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant settings (defaults: the reference's).

    Attributes:
        format: weight format (reference: int8 per output channel, symmetric absmax).
        alpha: migration strength (reference default 0.5; its README uses 0.85 for Llama-2/3, Mistral).
        act_bits: activation bits (8).
        act_granularity: ``per_token`` (dynamic, the reference's Llama setting) or ``per_tensor`` (dynamic).

    With ``wakv`` (the LLM-QAT tables' SmoothQuant rows; W must equal ``format.bits``) the W-A-KV activation
    quantizer (per token, Eq. 3; :mod:`quantlab.wakv_step`) replaces ``act_bits`` / ``act_granularity``.
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
        if cfg.wakv:  # W-A-KV rows: the shared LLM-QAT activation / KV fake quantization follows (quantlab.wakv_step)
            act_bits, act_gran = WAKV.parse(cfg.wakv).a_bits, "per_token (W-A-KV, Eq. 3 MinMax)"
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
