"""SmoothQuant+ (Pan et al. 2023, arXiv 2312.03788): smoothing with ONE whole-model alpha, then 4-bit RTN.

1. Statistics (section 3.4.1): per-channel max |x| of every smoothed group's input in the
   full-precision model over the whole calibration set (the paper: the 164 HumanEval prompts, which
   ``calib=humaneval_prompts`` feeds one prompt per sequence, BOS as the tokenizer adds it; the
   engine batches equal-length prompts, no padding), and
   per-channel max |W| over the concatenated rows of all Linears sharing that input (``weight_max:
   concat``, upstream SmoothQuant's convention; the paper is silent).
2. Smoothing (section 2.2, fig. 5): eq. (6) ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (1e-5 floors
   of the reference), folded exactly by eq. (5) ``Y = (X diag(s)^-1)(W diag(s))^T``: 1/s into
   input_layernorm (q/k/v), post_attention_layernorm (gate/up), up_proj's output rows (down_proj) and,
   with ``smooth_vo``, v_proj's output rows (o_proj, only where exact: no grouped-query attention).
3. Quantization (section 3.1.3): group-wise 4-bit RTN of every decoder Linear, asymmetric min/max with
   a zero point (``zero_in_range: false``, the SmoothQuant+ vLLM fork's ``auto_quant``); lm_head stays
   full precision (the fork's ``modules_to_not_convert``).
4. alpha (sections 3.1.3, 3.4.2): grid 0..1 step 0.05 (21 values), minimising the quantization loss of
   the ENTIRE model (final outputs vs the fp model on the calibration set). The paper names this loss
   but never defines it (and released no search code): ``loss`` picks quantlab's reading, default
   ``logits_mse`` (see :class:`SmoothQuantPlusConfig`; the definitions and the cost model are in
   :mod:`quantlab.algorithms.alpha_search`). A given ``alpha`` skips the search (one statistics pass only).

Outputs: the curve as table ``alpha_search`` (rows ``alpha``, ``loss`` (the searched loss), ``loss_name``,
``hidden_mse`` (recorded whatever ``loss`` is: the per-element MSE of the final-norm output, the scale
Table 4's loss values appear to be on), ``chosen``) and plot ``alpha_search.png``; the summary names the
loss (``loss``) and gives ``best_loss``, ``loss_rtn``, ``hidden_mse_best``, ``hidden_mse_rtn``; artifacts
``smooth.<block>.<group key>`` (the chosen ``s``) and ``smoothquant_plus.alpha``, re-applied bit for bit by
``load_artifacts`` without calibration or search.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.algorithms.alpha_search import LOSSES, SearchResult, plot_alpha_search, search_alpha
from quantlab.calib.sequential import Tokens
from quantlab.calib.stats import collect_group_absmax
from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping
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

WEIGHT_MAX = ("concat",)
DEFAULT_LOSS = "logits_mse"  # quantlab's choice; the paper does not define its loss (SmoothQuantPlusConfig)


def _w4g128() -> QuantFormat:
    return QuantFormat(bits=4, group_size=128, symmetric=False, zero_in_range=False)


def _opt_int(value: object, key: str) -> None:
    if value is not None and (not is_int(value) or value < 1):
        raise ConfigError(key, f"must be null or an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class SmoothQuantPlusConfig(CalibratedConfig):
    """SmoothQuant+ settings (defaults: the paper's).

    Attributes:
        format: weight format after smoothing (paper: 4-bit, g128, asymmetric min/max, AWQ-style).
        alpha: smoothing strength; None = grid search (the paper), a number in [0, 1] skips the search.
        alpha_min / alpha_max / alpha_step: the grid (paper: 0, 1, 0.05: 21 values).
        loss: whole-model loss the search minimises, vs the fp model on the same calibration tokens:
            ``logits_mse`` (default), ``hidden_mse`` or ``kl`` (definitions:
            :mod:`quantlab.algorithms.alpha_search`). The paper only names "the quantization loss of the
            entire model" (its formula (4) is one Linear's output error) and released no search code, so
            no choice is the paper's. The default stays ``logits_mse``, quantlab's choice: the error of
            the model's final outputs (the final-norm output ``h`` as the fp lm_head maps it to logits);
            nothing in the paper's text favours another reading, and a switch would change every default
            run. ``hidden_mse``: mean over tokens and hidden dims of ``(h_q - h_fp)^2``, ``h`` the last
            decoder layer's output after the final norm (the lm_head input), the literal "entire model"
            when the model is the quantized decoder stack, on the per-element MSE scale Table 4's losses
            (0.00449 / 0.00399 / 0.00363) appear to be on (unverified). It is recorded for every
            candidate whatever ``loss`` is. A non-default loss shows in the label (``loss:hidden_mse``).
        smooth_vo: also smooth v_proj -> o_proj where exact (no GQA); the paper does not say. The
            groups actually smoothed are in the summary (``smoothed_groups``).
        weight_max: ``concat``: max|W_j| over all Linears sharing input j (the only choice, kept visible).
        search_samples: evaluate the search loss on the first N calibration sequences (statistics still
            use all of them); None = all (the paper). A speed option, recorded in the summary.
        rtn_baseline: also measure plain RTN's loss during the search (one more stream, ~1/21 of it).
        alpha_batch: candidate streams advanced together (None = as many as the memory budget allows,
            :func:`~quantlab.calib.budget.streams_that_fit`; same search, bounded memory).
    """

    format: QuantFormat = field(default_factory=_w4g128)
    alpha: float | None = None
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_step: float = 0.05
    loss: str = DEFAULT_LOSS
    smooth_vo: bool = False
    weight_max: str = "concat"
    search_samples: int | None = None
    rtn_baseline: bool = True
    alpha_batch: int | None = None

    execution_fields: ClassVar[tuple[str, ...]] = ("batch_size", "alpha_batch")  # memory bounds, same search

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.format, QuantFormat):
            raise ConfigError("quantizer.format", f"must be a weight format, got {self.format!r}")
        if self.alpha is not None:
            check_alpha(self.alpha)
        for key in ("alpha_min", "alpha_max", "alpha_step"):
            check_alpha(getattr(self, key), f"quantizer.{key}")
        if self.alpha_step <= 0:
            raise ConfigError("quantizer.alpha_step", f"must be > 0, got {self.alpha_step!r}")
        if self.alpha_max < self.alpha_min:
            raise ConfigError("quantizer.alpha_max", f"must be >= alpha_min ({self.alpha_min}), got {self.alpha_max}")
        if self.loss not in LOSSES:
            raise ConfigError("quantizer.loss", f"must be one of {LOSSES}, got {self.loss!r}")
        for key in ("smooth_vo", "rtn_baseline"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantizer.{key}", f"must be true or false, got {getattr(self, key)!r}")
        if self.weight_max not in WEIGHT_MAX:
            raise ConfigError("quantizer.weight_max", f"must be one of {WEIGHT_MAX}, got {self.weight_max!r}")
        _opt_int(self.search_samples, "quantizer.search_samples")
        _opt_int(self.alpha_batch, "quantizer.alpha_batch")

    def grid(self) -> list[float]:
        """alpha_min, alpha_min + step, ... up to alpha_max (inclusive up to 1e-9), rounded to 1e-9."""
        n = math.floor((self.alpha_max - self.alpha_min) / self.alpha_step + 1e-9)
        return [round(self.alpha_min + i * self.alpha_step, 9) for i in range(n + 1)]


def smoothed_groups(mapping: ArchMapping, block: nn.Module, smooth_vo: bool = False) -> list[ScaleGroup]:
    """SmoothQuant+'s groups of one block: norm -> q/k/v, norm -> gate/up, up -> down, [v -> o where exact]."""
    return [g for g in mapping.applicable_groups(block) if g.prev_kind == "norm" or g.prev == "mlp.up_proj"
            or (smooth_vo and g.prev == "self_attn.v_proj")]


@register_quantizer("smoothquant_plus", SmoothQuantPlusConfig)
class SmoothQuantPlusQuantizer(BlockwiseQuantizer[SmoothQuantPlusConfig]):
    """SmoothQuant+: whole-model alpha search, exact smoothing, group-wise RTN."""

    packable = True
    offloadable = True

    def label(self, model_dtype: str) -> str:
        """``smoothquant_plus w4g128a``, plus ``loss:<name>`` when the search minimises a loss other than
        the default (``loss:hidden_mse``), so tables never pool runs searched with different losses. A
        given ``alpha`` (no search) shows no loss."""
        c = self.config
        text = super().label(model_dtype)
        return f"{text} loss:{c.loss}" if c.alpha is None and c.loss != DEFAULT_LOSS else text

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        cfg = self.config
        mapping = get_mapping(model)
        targets = self.block_targets(model, mapping)
        groups_fn = partial(smoothed_groups, mapping, smooth_vo=cfg.smooth_vo)
        summary: dict[str, Any] = {"searched": False}
        tables: dict[str, list[dict[str, Any]]] = {}
        images = {}
        if cfg.load_artifacts:
            scales_fn, alpha, saved = load_saved_scales(cfg.load_artifacts, self.name, model, mapping, groups_fn)
            warn_format_change(saved, cfg.format, self.name)
            summary["loaded_from"] = str(cfg.load_artifacts)
        else:
            if calib is None:
                raise ConfigError("calib", "smoothquant_plus needs calibration data")
            if cfg.alpha is None:
                res = self._search(model, mapping, calib.tokens, targets, groups_fn, ctx)
                alpha, stats = res.alphas[res.best], res.stats
                tables["alpha_search"] = _rows(res)
                images["alpha_search"] = plot_alpha_search(tables["alpha_search"], ctx.output_dir / "alpha_search.png",
                                                           cfg.loss, res.rtn_loss)
                summary.update(_search_summary(res, cfg))
            else:
                alpha = float(cfg.alpha)
                t0 = time.perf_counter()
                stats = collect_group_absmax(model, mapping, calib.tokens, device=ctx.device, batch_size=cfg.batch_size)
                summary["stats_s"] = round(time.perf_counter() - t0, 3)
            scales_fn = stats_scales(stats, alpha)
        codes: dict[str, QuantizedWeight] | None = {} if ctx.keep_codes else None
        scales, ref_w = smooth_and_quantize(model, mapping, groups_fn, targets, cfg.format, ctx.device, scales_fn,
                                            keep_reference=ctx.keep_reference_weights, codes=codes)
        summary.update({"alpha": alpha, "n_layers": len(targets), "weight_format": cfg.format.short_name(),
                        "weight_max": cfg.weight_max, "smooth_vo": cfg.smooth_vo,
                        "smoothed_groups": _group_keys(mapping, model, groups_fn)})
        log.info("smoothquant+: alpha %.2f (%s), groups %s, %s on %d Linears", alpha,
                 "searched" if summary["searched"] else "given", summary["smoothed_groups"],
                 cfg.format.short_name(), len(targets))
        arts = {**scales, "smoothquant_plus.alpha": torch.tensor(alpha, dtype=torch.float64)}
        return QuantResult(model=model, quantized_layers=targets, artifacts=arts, summary=summary, tables=tables,
                           images=images, reference_weights=ref_w, codes=codes)

    def _search(self, model: nn.Module, mapping: ArchMapping, tokens: Tokens, targets: list[str],
                groups_fn, ctx: RunContext) -> SearchResult:
        cfg = self.config
        res = search_alpha(model, mapping, tokens, groups_fn=groups_fn, targets=targets, alphas=cfg.grid(),
                           fmt=cfg.format, loss=cfg.loss, device=ctx.device, batch_size=cfg.batch_size,
                           search_samples=cfg.search_samples, rtn_baseline=cfg.rtn_baseline,
                           alpha_batch=cfg.alpha_batch)
        if not math.isfinite(res.losses[res.best]):
            raise ConfigError("quantizer.alpha", "every alpha of the grid gave non-finite activations; check the dtype")
        log.info("smoothquant+ search (%s): %s", cfg.loss,
                 ", ".join(f"{a:.2f}:{v:.5g}" for a, v in zip(res.alphas, res.losses)))
        return res


def _group_keys(mapping: ArchMapping, model: nn.Module, groups_fn) -> list[str]:
    """Keys of the groups smoothed in any block, in mapping order."""
    done = {g.key for b in mapping.blocks(model) for g in groups_fn(b)}
    return [g.key for g in mapping.groups if g.key in done]


def _rows(res: SearchResult) -> list[dict[str, Any]]:
    return [{"alpha": a, "loss": v, "loss_name": res.loss, "hidden_mse": h, "chosen": i == res.best}
            for i, (a, v, h) in enumerate(zip(res.alphas, res.losses, res.hidden_mse))]


def _search_summary(res: SearchResult, cfg: SmoothQuantPlusConfig) -> dict[str, Any]:
    out = {
        "searched": True, "loss": res.loss, "best_loss": res.losses[res.best], "loss_alpha0": res.losses[0],
        "hidden_mse_best": res.hidden_mse[res.best],
        "n_alphas": len(res.alphas), "search_s": round(res.seconds, 3),
        "search_s_per_alpha": round(res.seconds / (len(res.alphas) + (res.rtn_loss is not None)), 3),
        "search_samples": res.n_samples, "search_tokens": res.n_tokens,
    }
    if res.rtn_loss is not None:
        out["loss_rtn"] = res.rtn_loss
        out["hidden_mse_rtn"] = res.rtn_hidden_mse
    return out
