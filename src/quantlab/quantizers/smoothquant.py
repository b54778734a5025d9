"""SmoothQuant W8A8 (Xiao et al. 2023): migrate activation outliers into the weights, then int8 both.

``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (SmoothQuant eq. 4, the same formula as SmoothQuant+
eq. 6) is folded into input_layernorm for q/k/v and post_attention_layernorm for gate/up (o_proj and
down_proj are not smoothed, as in the reference ``smooth_lm``). Weights are then int8 per output
channel (symmetric absmax), and every quantized Linear's input is fake-quantized to int8 per token
(or per tensor) on each forward (:class:`~quantlab.nn.act_quant.ActQuantLinear`). This is the
W8A8 baseline of the LLM-QAT tables.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.algorithms.smoothing import fold_group_scales, group_scales
from quantlab.calib.sequential import on_device
from quantlab.calib.stats import collect_group_absmax
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping
from quantlab.nn.act_quant import GRANULARITIES, swap_act_quant
from quantlab.quantizers.base import CalibratedConfig, Quantizer, register_quantizer
from quantlab.quantizers.smoothing_common import reapply_smoothing
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)


def _w8() -> QuantFormat:
    return QuantFormat(bits=8, group_size=-1, symmetric=True)


@dataclass(frozen=True)
class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant settings.

    Attributes:
        format: weight format (reference: int8 per output channel, symmetric absmax).
        alpha: migration strength (reference default 0.5; its README uses 0.85 for Llama-2).
        act_bits: activation bits (8).
        act_granularity: ``per_token`` (dynamic, the reference's Llama setting) or ``per_tensor``.
    """

    format: QuantFormat = field(default_factory=_w8)
    alpha: float = 0.5
    act_bits: int = 8
    act_granularity: str = "per_token"

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ConfigError("quantizer.alpha", f"must be a number in [0, 1], got {a!r}")
        if not is_int(self.act_bits) or not 2 <= self.act_bits <= 16:
            raise ConfigError("quantizer.act_bits", f"must be an integer in [2, 16], got {self.act_bits!r}")
        if self.act_granularity not in GRANULARITIES:
            raise ConfigError("quantizer.act_granularity", f"must be one of {GRANULARITIES}, got {self.act_granularity!r}")


def norm_groups(mapping: ArchMapping, block: nn.Module) -> list[ScaleGroup]:
    """The reference's Llama pairs: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up."""
    return [g for g in mapping.applicable_groups(block) if g.prev_kind == "norm"]


def _w_only(block: nn.Module, rel_targets: list[str], fmt: QuantFormat) -> None:
    for rel in rel_targets:
        w = block.get_submodule(rel).weight
        w.data.copy_(affine.fake_quantize(w.data, fmt))


@register_quantizer("smoothquant", SmoothQuantConfig)
class SmoothQuantQuantizer(Quantizer[SmoothQuantConfig]):
    """SmoothQuant W8A8 fake quantization."""

    requires_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        cfg = self.config
        targets = {name for name, _ in self.target_linears(model)}
        mapping = get_mapping(model)
        groups_fn = lambda block: norm_groups(mapping, block)  # noqa: E731
        if cfg.load_artifacts:
            res = reapply_smoothing(self, model, mapping, targets, groups_fn, _w_only)
        else:
            if calib is None:
                raise ConfigError("calib", "smoothquant needs calibration data")
            stats = collect_group_absmax(model, mapping, calib.tokens, device=ctx.device, batch_size=cfg.batch_size)
            res = self._apply(model, mapping, stats, targets, groups_fn, ctx)
        swap_act_quant(model, sorted(targets), cfg.act_bits, cfg.act_granularity)
        res.summary.update({"act_bits": cfg.act_bits, "act_granularity": cfg.act_granularity})
        return res

    def _apply(self, model, mapping, stats, targets, groups_fn, ctx) -> QuantResult:
        cfg = self.config
        arts = {"smoothquant.alpha": torch.tensor(float(cfg.alpha), dtype=torch.float64)}
        ref_w: dict[str, torch.Tensor] | None = {} if ctx.keep_reference_weights else None
        outside = sorted(t for t in targets if not t.startswith(mapping.layers + "."))
        if outside:
            raise ConfigError("quantizer.include", f"smoothquant covers decoder-block Linears only; got {outside[:5]}")
        for i, block in enumerate(mapping.blocks(model)):
            name = mapping.block_name(i)
            groups = groups_fn(block)
            with on_device([block], ctx.device):
                scales = group_scales(block, groups, {g.key: stats[f"{name}.{g.key}"] for g in groups}, float(cfg.alpha))
                fold_group_scales(block, groups, scales)
                rel_t = [n[len(name) + 1:] for n in sorted(targets) if n.startswith(name + ".")]
                if ref_w is not None:
                    ref_w.update({f"{name}.{r}": block.get_submodule(r).weight.detach().to("cpu", copy=True) for r in rel_t})
                _w_only(block, rel_t, cfg.format)
            arts.update({f"smooth.{name}.{g.key}": s.cpu() for g in groups for s in [scales[g.key]]})
        log.info("smoothquant: alpha %.2f, W%dA%d (%s)", cfg.alpha, cfg.format.bits, cfg.act_bits, cfg.act_granularity)
        return QuantResult(model=model, quantized_layers=sorted(targets), artifacts=arts, reference_weights=ref_w,
                           summary={"alpha": float(cfg.alpha), "n_layers": len(targets),
                                    "smoothed_groups": [g.key for g in groups_fn(mapping.blocks(model)[0])]})
