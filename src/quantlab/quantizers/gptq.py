"""GPTQ: Hessian-aware column-by-column rounding with error feedback, block by block.

Orchestration only; the math is :func:`quantlab.algorithms.gptq.gptq_quantize_weight`. Inside each
decoder block the Linears are processed in the true-sequential order of the architecture mapping
(Llama: [k, v, q] -> [o] -> [up, gate] -> [down]); every subset's Hessian is collected with the
earlier subsets already quantized, and Linears sharing an input share one Hessian. The block's
outputs are then recomputed with the quantized weights and feed the next block (errors propagate,
as in the reference ``llama_sequential`` and llm-compressor).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantlab.algorithms.gptq import HessianAccumulator, dequantize_gidx, gptq_quantize_weight
from quantlab.calib.sequential import BlockContext, run_sequential
from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import get_mapping
from quantlab.quantizers import artifacts
from quantlab.quantizers.base import CalibratedConfig, Quantizer, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)


def _gptq_format() -> QuantFormat:
    return QuantFormat(bits=4, group_size=128, symmetric=False, zero_in_range=True)


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ settings (defaults: the reference ``llama.py``, except the group size).

    Attributes:
        format: weight format; GPTQ's convention widens each range to include 0 (zero_in_range).
        damp: relative dampening added to diag(H) (reference ``percdamp`` 0.01).
        damp_increment: added to ``damp`` each time the Cholesky factorisation fails (recorded).
        max_damp: give up (clear error) beyond this damping.
        block_size: lazy-batch width (128).
        act_order: quantize columns by decreasing Hessian diagonal ("desc_act").
        static_groups: group parameters from the original weights (act_order then costs nothing at
            inference); otherwise from the error-updated weights (reference default).
        true_sequential: quantize the block's Linears subset by subset (mapping order), each subset's
            Hessian collected with earlier subsets quantized; False = all Hessians from the fp block.
    """

    format: QuantFormat = field(default_factory=_gptq_format)
    damp: float = 0.01
    damp_increment: float = 0.01
    max_damp: float = 1.0
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("damp", "damp_increment", "max_damp"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"quantizer.{key}", f"must be a number >= 0, got {v!r}")
        if self.max_damp < self.damp:
            raise ConfigError("quantizer.max_damp", f"must be >= damp ({self.damp}), got {self.max_damp}")
        if not is_int(self.block_size) or self.block_size < 1:
            raise ConfigError("quantizer.block_size", f"must be an integer >= 1, got {self.block_size!r}")
        for key in ("act_order", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantizer.{key}", f"must be true or false, got {getattr(self, key)!r}")


@register_quantizer("gptq", GPTQConfig)
class GPTQQuantizer(Quantizer[GPTQConfig]):
    """GPTQ on the shared calibration engine."""

    requires_calibration = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        targets = {name for name, _ in self.target_linears(model)}
        if self.config.load_artifacts:
            return self._reapply(model, targets)
        if calib is None:
            raise ConfigError("calib", "gptq needs calibration data")
        mapping = get_mapping(model)
        rows: list[dict[str, Any]] = []
        arts: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()

        def per_block(bctx: BlockContext) -> list[torch.Tensor] | None:
            if self.config.true_sequential:
                subsets = [[n for n in sub if bctx.full_name(n) in targets] for sub in mapping.sequential]
                subsets = [s for s in subsets if s]
                if len(bctx.inputs.hidden) == 1:  # the whole calibration set is one chunk: one pass
                    return self._inline_block(bctx, subsets, rows, arts)
                for names in subsets:
                    self._quantize_subset(bctx, names, rows, arts)
                return None
            names = [n for n in sum(mapping.sequential, ()) if bctx.full_name(n) in targets]
            hessians = {}
            for sub in mapping.sequential:  # all Hessians from the fp block, then quantize
                sub = [n for n in sub if n in names]
                if sub:
                    hessians[sub[0]] = (sub, self._hessian(bctx, sub[0]))
            for sub, acc in hessians.values():
                self._gptq_layers(bctx, sub, acc, rows, arts)
            return None

        run_sequential(model, mapping, calib.tokens, per_block, device=ctx.device,
                       batch_size=self.config.batch_size, propagate="quantized", desc="gptq")
        # Linears outside the block mapping (none for Llama) would be left unquantized: say so
        done = [r["layer"] for r in rows]
        missing = sorted(targets - set(done))
        if missing:
            raise ConfigError("quantizer.include", f"gptq covers decoder-block Linears only; cannot quantize {missing[:5]}")
        escalated = [r["layer"] for r in rows if r["damp"] > self.config.damp]
        summary = {
            "n_layers": len(rows),
            "damp_max": max((r["damp"] for r in rows), default=self.config.damp),
            "damp_escalated_layers": escalated,
            "dead_columns": sum(r["dead_columns"] for r in rows),
            "mean_gptq_loss": sum(r["loss"] for r in rows) / max(len(rows), 1),
            "calib_tokens": int(calib.tokens.numel()),
            "search_s": round(time.perf_counter() - t0, 3),
        }
        if escalated:
            log.warning("gptq: damping escalated for %d layers (max %.3g)", len(escalated), summary["damp_max"])
        return QuantResult(model=model, quantized_layers=done, artifacts=arts, summary=summary,
                           tables={"gptq_layers": rows})

    def _inline_block(self, bctx: BlockContext, subsets: list[list[str]], rows: list, arts: dict) -> list[torch.Tensor]:
        """True-sequential GPTQ in ONE forward (calibration set in a single chunk).

        A pre-hook on every Linear of a subset fires at the subset's first call: it builds the
        Hessian from that input (the whole calibration set), quantizes the subset, and the forward
        continues with the quantized weights, so each later subset sees the earlier ones quantized
        exactly as in the multi-pass schedule, and the block's output is the quantized block's.
        """
        owner = {n: i for i, sub in enumerate(subsets) for n in sub}
        done: set[int] = set()

        def make(rel: str):
            def pre(_mod: nn.Module, args: tuple) -> None:
                i = owner[rel]
                if i in done:
                    return
                acc = HessianAccumulator(args[0].shape[-1], bctx.device, args[0].dtype)
                acc.add(args[0])
                self._gptq_layers(bctx, subsets[i], acc, rows, arts)
                done.add(i)
            return pre

        handles = [bctx.module(n).register_forward_pre_hook(make(n)) for n in owner]
        try:
            outs = bctx.forward()
        finally:
            for h in handles:
                h.remove()
        if len(done) != len(subsets):
            raise RuntimeError(f"{bctx.name}: subsets {sorted(set(range(len(subsets))) - done)} were never called")
        return outs

    def _hessian(self, bctx: BlockContext, rel: str) -> HessianAccumulator:
        first = bctx.module(rel)
        acc = HessianAccumulator(first.in_features, bctx.device, first.weight.dtype)
        bctx.collect([rel], lambda _n, x, _kw, _c: acc.add(x), early_exit=True)
        return acc

    def _quantize_subset(self, bctx: BlockContext, names: list[str], rows: list, arts: dict) -> None:
        """One Hessian per distinct input (all of ``names`` share it in the mapping), then GPTQ each Linear."""
        self._gptq_layers(bctx, names, self._hessian(bctx, names[0]), rows, arts)

    def _gptq_layers(self, bctx: BlockContext, names: list[str], acc: HessianAccumulator, rows: list, arts: dict) -> None:
        cfg = self.config
        for rel in names:
            mod = bctx.module(rel)
            res = gptq_quantize_weight(
                mod.weight.data, acc.H, cfg.format, damp=cfg.damp, damp_increment=cfg.damp_increment,
                max_damp=cfg.max_damp, block_size=cfg.block_size, act_order=cfg.act_order,
                static_groups=cfg.static_groups,
            )
            mod.weight.data.copy_(res.weight.to(mod.weight.dtype))
            fqn = bctx.full_name(rel)
            arts[f"{fqn}.qweight"] = res.codes.cpu()
            arts[f"{fqn}.scales"] = res.scales.to(torch.float32).cpu() if res.scales.dtype != torch.float64 else res.scales.cpu()
            arts[f"{fqn}.zeros"] = res.zeros.to(torch.uint8).cpu()
            arts[f"{fqn}.g_idx"] = res.g_idx.cpu()
            if res.perm is not None:
                arts[f"{fqn}.perm"] = res.perm.cpu()
            rows.append({"layer": fqn, "loss": res.loss, "damp": res.damp, "dead_columns": res.dead_columns})

    def _reapply(self, model: nn.Module, targets: set[str]) -> QuantResult:
        src = self.config.load_artifacts
        tensors, saved = artifacts.load_artifacts(src, self.name)
        done = []
        for name in sorted(targets):
            mod = model.get_submodule(name)
            codes = artifacts.require(tensors, f"{name}.qweight", src)
            scales = artifacts.require(tensors, f"{name}.scales", src)
            zeros = artifacts.require(tensors, f"{name}.zeros", src).to(scales.dtype)
            g_idx = artifacts.require(tensors, f"{name}.g_idx", src)
            if tuple(codes.shape) != tuple(mod.weight.shape):
                raise ConfigError(artifacts.KEY, f"{src}: {name} has shape {tuple(codes.shape)}, model has {tuple(mod.weight.shape)}")
            w = dequantize_gidx(codes.to(mod.weight.device), scales.to(mod.weight.device), zeros.to(mod.weight.device),
                                g_idx.to(mod.weight.device))
            mod.weight.data.copy_(w.to(mod.weight.dtype))
            done.append(name)
        log.info("gptq: re-applied %d layers from %s", len(done), src)
        return QuantResult(model=model, quantized_layers=done, summary={"n_layers": len(done), "loaded_from": str(src)})
