"""SmoothQuant+ (Pan et al. 2023, arXiv 2312.03788): smoothing with ONE whole-model alpha, then 4-bit RTN.

1. Statistics: per-channel max |x| of each smoothed group's input in the full-precision model over
   the calibration set (section 3.4.1), and per-channel max |W| over all Linears sharing that input.
2. For a smoothing strength alpha, eq. (6) gives ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; eq. (5)
   folds 1/s into the producer (input_layernorm for q/k/v, post_attention_layernorm for gate/up,
   up_proj's rows for down_proj, optionally v_proj's rows for o_proj where exact) and s into the
   consumers' columns (paper fig. 5). Then every decoder Linear is RTN-quantized (group-wise 4-bit,
   asymmetric min/max, g128 in the paper; lm_head stays full precision, as in the vLLM fork).
3. alpha: grid 0..1, step 0.05 (21 values, section 3.1.3), minimising the quantization loss of the
   ENTIRE model (final outputs vs the fp model on the calibration set), not block by block.

The search is block-major: the calibration activations of the fp model and of every candidate
alpha (one "stream" each) advance together through the blocks. Each block is moved to the device
once, its original parameters are kept once (one block, not one model), and for each alpha they are
restored in place, smoothed, rounded and run on that alpha's stream. Statistics come from the fp
stream on the way, and the fp reference (final hidden states after the final norm) is computed once.
Memory: one block's parameters twice plus (n_alphas + 1) x calibration activations; use
``search_samples`` to evaluate the loss on fewer sequences.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.algorithms.output_loss import LOSSES, gram, output_loss_sum
from quantlab.algorithms.smoothing import fold_group_scales, group_scales
from quantlab.calib.sequential import auto_batch_size, capture_block_inputs, check_finite, on_device
from quantlab.calib.stats import reduce_absmax
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping
from quantlab.quantizers.base import CalibratedConfig, Quantizer, register_quantizer
from quantlab.quantizers.smoothing_common import alpha_plot, reapply_smoothing
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothQuantPlusConfig(CalibratedConfig):
    """SmoothQuant+ settings.

    Attributes:
        format: weight format after smoothing (paper: 4-bit, g128, asymmetric min/max).
        alpha: smoothing strength; None = grid search (the paper), a number skips the search.
        alpha_min / alpha_max / alpha_step: the search grid (paper: 0, 1, 0.05).
        loss: whole-model loss: ``logits_mse`` (default), ``hidden_mse`` or ``kl`` (see
            :mod:`quantlab.algorithms.output_loss`).
        smooth_vo: also smooth v_proj -> o_proj where exact (no grouped-query attention); the paper
            does not say; the groups actually smoothed are recorded.
        weight_max: ``concat`` = max|W_j| over the rows of every Linear sharing input j (upstream
            SmoothQuant's convention; the paper is silent). The only option, kept visible.
        search_samples: evaluate the search loss on the first N calibration sequences (statistics
            still use all of them); None = all (the paper).
    """

    format: QuantFormat = field(default_factory=QuantFormat)
    alpha: float | None = None
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_step: float = 0.05
    loss: str = "logits_mse"
    smooth_vo: bool = False
    weight_max: str = "concat"
    search_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("alpha_min", "alpha_max", "alpha_step") + (("alpha",) if self.alpha is not None else ()):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"quantizer.{key}", f"must be a number in [0, 1], got {v!r}")
        if self.alpha_step <= 0:
            raise ConfigError("quantizer.alpha_step", f"must be > 0, got {self.alpha_step}")
        if self.alpha_max < self.alpha_min:
            raise ConfigError("quantizer.alpha_max", f"must be >= alpha_min ({self.alpha_min})")
        if self.loss not in LOSSES:
            raise ConfigError("quantizer.loss", f"must be one of {LOSSES}, got {self.loss!r}")
        if not isinstance(self.smooth_vo, bool):
            raise ConfigError("quantizer.smooth_vo", f"must be true or false, got {self.smooth_vo!r}")
        if self.weight_max != "concat":
            raise ConfigError("quantizer.weight_max", f"only 'concat' is implemented, got {self.weight_max!r}")
        n = self.search_samples
        if n is not None and (not is_int(n) or n < 1):
            raise ConfigError("quantizer.search_samples", f"must be null or an integer >= 1, got {n!r}")

    def grid(self) -> list[float]:
        """The alphas searched: alpha_min, alpha_min + step, ..., alpha_max (rounded to 1e-9)."""
        n = int(round((self.alpha_max - self.alpha_min) / self.alpha_step))
        return [round(self.alpha_min + i * self.alpha_step, 9) for i in range(n + 1)]


def smoothed_groups(mapping: ArchMapping, block: nn.Module, smooth_vo: bool) -> list[ScaleGroup]:
    """SmoothQuant+'s groups in one block: norm -> q/k/v, norm -> gate/up, up -> down, [v -> o]."""
    return [g for g in mapping.applicable_groups(block) if smooth_vo or g.prev_kind == "norm" or g.prev == "mlp.up_proj"]


def _block_params(block: nn.Module, groups: list[ScaleGroup], targets: list[str]) -> dict[str, torch.Tensor]:
    names = {g.prev for g in groups} | {n for g in groups for n in g.linears} | set(targets)
    out = {}
    for n in names:
        for pname, p in block.get_submodule(n).named_parameters(recurse=False):
            out[f"{n}.{pname}"] = p
    return out


def _rtn_(block: nn.Module, rel_targets: list[str], fmt: QuantFormat) -> None:
    for rel in rel_targets:
        w = block.get_submodule(rel).weight
        w.data.copy_(affine.fake_quantize(w.data, fmt))


@register_quantizer("smoothquant_plus", SmoothQuantPlusConfig)
class SmoothQuantPlusQuantizer(Quantizer[SmoothQuantPlusConfig]):
    """SmoothQuant+ with the whole-model alpha search."""

    requires_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        cfg = self.config
        targets = {name for name, _ in self.target_linears(model)}
        mapping = get_mapping(model)
        if cfg.load_artifacts:
            return reapply_smoothing(self, model, mapping, targets, self._groups_fn(mapping), _rtn_)
        if calib is None:
            raise ConfigError("calib", "smoothquant_plus needs calibration data")
        alphas = [float(cfg.alpha)] if cfg.alpha is not None else cfg.grid()
        t0 = time.perf_counter()
        stats, losses = self._search(model, mapping, calib.tokens, targets, alphas, ctx.device)
        search_s = time.perf_counter() - t0
        best = min(range(len(alphas)), key=lambda i: losses[i]) if losses else 0
        alpha = alphas[best]
        arts, ref_w, groups_done = self._apply(model, mapping, stats, targets, alpha, ctx)
        summary: dict[str, Any] = {
            "alpha": alpha, "searched": cfg.alpha is None, "loss": cfg.loss, "best_loss": losses[best] if losses else None,
            "n_alphas": len(alphas), "search_s": round(search_s, 3), "smoothed_groups": groups_done,
            "search_samples": cfg.search_samples or int(calib.tokens.shape[0]), "n_layers": len(targets),
        }
        tables, images = {}, {}
        if cfg.alpha is None:
            rows = [{"alpha": a, "loss": v, "chosen": i == best} for i, v, a in zip(range(len(alphas)), losses, alphas)]
            summary["loss_at_alpha0"] = losses[0]
            tables["alpha_search"] = rows
            images["alpha_search"] = alpha_plot(rows, ctx.output_dir / "alpha_search.png", cfg.loss)
        log.info("smoothquant+: alpha=%.2f (%s, %d candidates, %.1fs)", alpha, "searched" if cfg.alpha is None else "given",
                 len(alphas), search_s)
        return QuantResult(model=model, quantized_layers=sorted(targets), artifacts=arts, summary=summary,
                           tables=tables, images=images, reference_weights=ref_w)

    def _groups_fn(self, mapping: ArchMapping):
        return lambda block: smoothed_groups(mapping, block, self.config.smooth_vo)

    def _search(self, model, mapping, tokens, targets, alphas, device) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Block-major pass: fp statistics for every block, and the whole-model loss of each alpha."""
        cfg = self.config
        searching = len(alphas) > 1
        bs = auto_batch_size(tokens.shape[0], tokens.shape[1], cfg.batch_size)
        data = capture_block_inputs(model, mapping, tokens, device=device, batch_size=bs)
        fp = list(zip(data.hidden, data.kwargs))
        n_search = min(cfg.search_samples or tokens.shape[0], tokens.shape[0])
        search_chunks = _first_samples(fp, n_search)
        streams = [[h for h, _ in search_chunks] for _ in alphas] if searching else []
        stats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(mapping.blocks(model)):
            name = mapping.block_name(i)
            with on_device([block], device):
                groups = smoothed_groups(mapping, block, cfg.smooth_vo)
                fp = self._fp_block(block, name, groups, fp, stats)
                if searching:
                    rel_t = [n[len(name) + 1:] for n in sorted(targets) if n.startswith(name + ".")]
                    act = {g.key: stats[f"{name}.{g.key}"] for g in groups}
                    params = _block_params(block, groups, rel_t)
                    orig = {k: p.detach().clone() for k, p in params.items()}
                    for a_i, a in enumerate(alphas):
                        fold_group_scales(block, groups, group_scales(block, groups, act, a))
                        _rtn_(block, rel_t, cfg.format)
                        streams[a_i] = [_out(block(h, **kw)) for h, (_, kw) in zip(streams[a_i], search_chunks)]
                        check_finite(streams[a_i][0], f"the output of {name} (alpha {a})")
                        for k, p in params.items():
                            p.data.copy_(orig[k])
                    del orig
            search_chunks = [(h, kw) for (h, kw) in _first_samples(fp, n_search)]
        if not searching:
            return stats, []
        return stats, self._losses(model, mapping, streams, [h for h, _ in search_chunks], device)

    def _fp_block(self, block, name, groups, fp, stats):
        """Run the fp block on the fp stream, recording each group's input max |x|."""
        first = {g.linears[0]: g for g in groups}
        handles = []
        for rel, g in first.items():
            def hook(_m, args, key=f"{name}.{g.key}"):
                m = reduce_absmax(args[0]).cpu()
                stats[key] = m if key not in stats else torch.maximum(stats[key], m)
            handles.append(block.get_submodule(rel).register_forward_pre_hook(hook))
        try:
            out = []
            for h, kw in fp:
                o = _out(block(h, **kw))
                check_finite(o, f"the output of {name}")
                out.append((o, kw))
        finally:
            for hd in handles:
                hd.remove()
        return out

    def _losses(self, model, mapping, streams, fp_final, device) -> list[float]:
        norm = model.get_submodule(mapping.final_norm)
        head = model.get_submodule(mapping.lm_head)
        with on_device([norm, head], device):
            G = gram(head.weight) if self.config.loss == "logits_mse" else None
            ref = [norm(h) for h in fp_final]
            n_tok = sum(r.shape[0] * r.shape[1] for r in ref)
            return [sum(output_loss_sum(self.config.loss, norm(hq), hf, head.weight, G) for hq, hf in zip(s, ref)) / n_tok
                    for s in streams]

    def _apply(self, model, mapping, stats, targets, alpha, ctx):
        """Smooth every block with ``alpha`` and RTN-quantize; returns artifacts, reference weights, groups."""
        arts: dict[str, torch.Tensor] = {"smoothquant_plus.alpha": torch.tensor(alpha, dtype=torch.float64)}
        ref_w: dict[str, torch.Tensor] | None = {} if ctx.keep_reference_weights else None
        done: list[str] = []
        for i, block in enumerate(mapping.blocks(model)):
            name = mapping.block_name(i)
            groups = smoothed_groups(mapping, block, self.config.smooth_vo)
            act = {g.key: stats[f"{name}.{g.key}"] for g in groups}
            with on_device([block], ctx.device):
                scales = group_scales(block, groups, act, alpha)
                fold_group_scales(block, groups, scales)
                rel_t = [n[len(name) + 1:] for n in sorted(targets) if n.startswith(name + ".")]
                if ref_w is not None:
                    ref_w.update({f"{name}.{r}": block.get_submodule(r).weight.detach().to("cpu", copy=True) for r in rel_t})
                _rtn_(block, rel_t, self.config.format)
            for g in groups:
                arts[f"smooth.{name}.{g.key}"] = scales[g.key].cpu()
            if i == 0:
                done = [g.key for g in groups]
        outside = sorted(t for t in targets if not t.startswith(mapping.layers + "."))
        if outside:
            raise ConfigError("quantizer.include", f"smoothquant_plus covers decoder-block Linears only; got {outside[:5]}")
        return arts, ref_w, done


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


def _first_samples(chunks: list[tuple[torch.Tensor, dict]], n: int) -> list[tuple[torch.Tensor, dict]]:
    """The leading chunks holding the first ``n`` samples (the last one cut to size)."""
    out, left = [], n
    for h, kw in chunks:
        if left <= 0:
            break
        out.append((h[:left], kw) if h.shape[0] > left else (h, kw))
        left -= h.shape[0]
    return out
