"""AWQ on the shared calibration engine (reference: ``llm-awq run_awq``; AutoAWQ for the RTN step).

Per decoder block, with inputs from the *full-precision* previous blocks (no error propagation,
as in the reference): capture the inputs of every scaling group's inspected module once; for each
group (mapping order: norm -> q/k/v, [v -> o without GQA], norm -> gate/up, up -> down) grid-search
the scales against the fp output of the inspected module, fold the best ones (exact); then search
a clip value per weight group for every Linear but q/k; then RTN-quantize the block's Linears.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.algorithms import awq as A
from quantlab.algorithms.smoothing import fold_scales
from quantlab.calib.sequential import BlockContext, run_sequential
from quantlab.errors import ConfigError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ScaleGroup, get_mapping
from quantlab.quantizers import artifacts
from quantlab.quantizers.base import CalibratedConfig, Quantizer, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)
NO_CLIP = ("q_proj", "k_proj", "query", "key", "Wqkv")  # llm-awq auto_clip skips these


@dataclass(frozen=True)
class AWQConfig(CalibratedConfig):
    """AWQ settings (defaults: the paper / llm-awq).

    Attributes:
        format: weight format (w4 g128 asymmetric min/max, zero point).
        n_grid: scale-search grid size (ratios 0, 1/n, ..., (n-1)/n).
        duo_scaling: AutoAWQ's weight term in the scales (off: the paper and llm-awq).
        clip / clip_n_grid / clip_max_shrink / clip_tokens: the clip search (llm-awq auto_clip).
        search_tokens: None = the scale-search loss uses every calibration token (the reference);
            N = whole sequences evenly strided over the set, about N tokens (a speed option).
    """

    format: QuantFormat = field(default_factory=QuantFormat)
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_n_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    search_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_grid", "clip_n_grid", "clip_tokens"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ConfigError(f"quantizer.{key}", f"must be an integer >= 1, got {getattr(self, key)!r}")
        for key in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantizer.{key}", f"must be true or false, got {getattr(self, key)!r}")
        ms = self.clip_max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 < ms < 1:
            raise ConfigError("quantizer.clip_max_shrink", f"must be in (0, 1), got {ms!r}")
        st = self.search_tokens
        if st is not None and (not is_int(st) or st < 1):
            raise ConfigError("quantizer.search_tokens", f"must be null or an integer >= 1, got {st!r}")


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


@register_quantizer("awq", AWQConfig)
class AWQQuantizer(Quantizer[AWQConfig]):
    """AWQ scale + clip search, then RTN."""

    requires_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        targets = {name for name, _ in self.target_linears(model)}
        mapping = get_mapping(model)
        outside = sorted(t for t in targets if not t.startswith(mapping.layers + "."))
        if outside:
            raise ConfigError("quantizer.include", f"awq covers decoder-block Linears only; got {outside[:5]}")
        if self.config.load_artifacts:
            return self._reapply(model, mapping, targets)
        if calib is None:
            raise ConfigError("calib", "awq needs calibration data")
        st = self.config.search_tokens
        n, t = calib.tokens.shape
        keep = None if st is None else torch.linspace(0, n - 1, min(n, -(-st // t))).round().long().unique()
        state: dict[str, Any] = {"arts": {}, "rows": [], "skipped": [], "ref": {} if ctx.keep_reference_weights else None}
        t0 = time.perf_counter()
        run_sequential(model, mapping, calib.tokens, lambda b: self._block(b, targets, keep, state), device=ctx.device,
                       batch_size=self.config.batch_size, propagate="fp", desc="awq")
        rows = state["rows"]
        summary = {
            "n_layers": len(targets), "groups_searched": len(rows),
            "mean_best_ratio": sum(r["best_ratio"] for r in rows) / max(len(rows), 1),
            "groups_skipped": sorted(set(state["skipped"])), "duo_scaling": self.config.duo_scaling,
            "search_tokens": None if keep is None else int(len(keep) * t), "search_s": round(time.perf_counter() - t0, 3),
        }
        return QuantResult(model=model, quantized_layers=sorted(targets), artifacts=state["arts"], summary=summary,
                           tables={"awq_scales": rows}, reference_weights=state["ref"])

    # ------------------------------------------------------------------ one block
    def _block(self, b: BlockContext, targets: set[str], keep: torch.Tensor | None, state: dict) -> None:
        cfg = self.config
        groups = b.mapping.applicable_groups(b.block)
        state["skipped"] += [g.key for g in b.mapping.groups if g not in groups]
        inputs: dict[str, list] = {g.inspect: [] for g in groups}
        xsum: dict[str, torch.Tensor] = {}
        starts = [0]
        for h in b.inputs.hidden:
            starts.append(starts[-1] + h.shape[0])

        def on_input(name: str, x: torch.Tensor, kw: dict, chunk: int) -> None:
            flat = x.reshape(-1, x.shape[-1]).abs().float().sum(dim=0)
            xsum[name] = xsum[name] + flat if name in xsum else flat
            if keep is None:
                inputs[name].append((x, kw))
                return
            sel = torch.isin(torch.arange(x.shape[0]) + starts[chunk], keep)
            if sel.any():
                inputs[name].append((x[sel.to(x.device)], kw))

        b.collect(list(inputs), on_input, early_exit=False)
        n_tok = b.inputs.n_tokens
        for g in groups:
            x_mean = xsum[g.inspect] / n_tok
            s, row = self._search_group(b, g, inputs[g.inspect], x_mean)
            fold_scales(b.block, g, s)
            inputs[g.inspect] = [(x / s.to(x.dtype), kw) for x, kw in inputs[g.inspect]]  # the cached input is now x/s
            state["arts"][f"awq.scale.{b.name}.{g.key}"] = s.cpu()
            state["rows"].append({"block": b.name, "group": g.key, **row})
        rel_t = [n[len(b.name) + 1:] for n in sorted(targets) if n.startswith(b.name + ".")]
        if state["ref"] is not None:
            state["ref"].update({b.full_name(r): b.module(r).weight.detach().to("cpu", copy=True) for r in rel_t})
        if cfg.clip:
            owner = {lin: g for g in groups for lin in g.linears}
            for rel in rel_t:
                if any(tag in rel for tag in NO_CLIP) or rel not in owner:
                    continue
                x = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in inputs[owner[rel].inspect]])
                x = x[:: max(1, x.shape[0] // cfg.clip_tokens)][: cfg.clip_tokens]
                w = b.module(rel).weight
                m = A.search_clip(w.data, x, cfg.format, cfg.clip_n_grid, cfg.clip_max_shrink)
                w.data.copy_(A.apply_clip(w.data, m, cfg.format))
                state["arts"][f"awq.clip.{b.full_name(rel)}"] = m.float().cpu()
        for rel in rel_t:
            w = b.module(rel).weight
            w.data.copy_(affine.fake_quantize(w.data, cfg.format))

    def _search_group(self, b: BlockContext, g: ScaleGroup, data: list, x_mean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Grid search of eq. 5 for one group; loss = MSE of the inspected module's output (fp32)."""
        cfg = self.config
        mod = b.module(g.inspect)
        lins = [b.module(n) for n in g.linears]
        orig = [lin.weight.data.clone() for lin in lins]
        fp_out = [_out(mod(x, **kw)).float() for x, kw in data]
        numel = sum(o.numel() for o in fp_out)
        w_mean = A.weight_mean(orig, cfg.format).to(x_mean.device) if cfg.duo_scaling else None
        losses = []
        best = (float("inf"), None, None)
        for r in A.grid_ratios(cfg.n_grid):
            s = A.candidate_scales(x_mean, r, w_mean)
            for lin, w0 in zip(lins, orig):
                lin.weight.data.copy_(A.scaled_fake_quant(w0, s, cfg.format))
            loss = sum(float((_out(mod(x, **kw)).float() - ref).pow(2).sum()) for (x, kw), ref in zip(data, fp_out)) / numel
            losses.append(loss)
            if loss < best[0]:
                best = (loss, r, s)
        for lin, w0 in zip(lins, orig):
            lin.weight.data.copy_(w0)
        if best[2] is None:
            raise FloatingPointError(f"awq: no finite loss for {b.name}.{g.key} (losses {losses[:3]}...)")
        return best[2], {"best_ratio": best[1], "loss_best": best[0], "loss_ratio0": losses[0]}

    def _reapply(self, model: nn.Module, mapping: Any, targets: set[str]) -> QuantResult:
        src = self.config.load_artifacts
        tensors, _ = artifacts.load_artifacts(src, self.name)
        fmt = self.config.format
        for i, block in enumerate(mapping.blocks(model)):
            name = mapping.block_name(i)
            for g in mapping.applicable_groups(block):
                fold_scales(block, g, artifacts.require(tensors, f"awq.scale.{name}.{g.key}", src))
            for full in sorted(t for t in targets if t.startswith(name + ".")):
                w = model.get_submodule(full).weight
                clip = tensors.get(f"awq.clip.{full}")
                if clip is not None:
                    w.data.copy_(A.apply_clip(w.data, clip, fmt))
                w.data.copy_(affine.fake_quantize(w.data, fmt))
        log.info("awq: re-applied scales and clips from %s", src)
        return QuantResult(model=model, quantized_layers=sorted(targets), summary={"n_layers": len(targets), "loaded_from": str(src)})
