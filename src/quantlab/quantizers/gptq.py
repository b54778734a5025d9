"""GPTQ (Frantar et al. 2022): Hessian-aware column-by-column rounding with error feedback.

Orchestration only; the math is :func:`quantlab.algorithms.gptq.gptq_quantize_weight`. Blocks are
visited by the shared calibration engine (:func:`quantlab.calib.sequential.run_sequential`). Inside
a block the Linears are processed in the architecture mapping's true-sequential order (Llama:
[k, v, q] -> [o] -> [up, gate] -> [down]): each subset's Hessian is collected with the earlier
subsets already quantized, and Linears that share an input share one Hessian. The block's outputs
are then recomputed with the quantized weights and feed the next block (errors propagate, as in the
reference ``llama_sequential`` and llm-compressor). Variable-length calibration data
(``calib.sampling=documents``) arrives as unpadded equal-length chunks, so each Hessian is
``(2/N) sum`` over exactly the real tokens of the N sequences.

Artifacts per quantized Linear ``<fqn>``: ``<fqn>.qweight`` (uint8 codes, (out, in)),
``<fqn>.scales`` ((out, n_groups), float32; float64 for a float64 model), ``<fqn>.zeros`` (uint8,
(out, n_groups)), ``<fqn>.g_idx`` (int32, (in,)) and, with act_order, ``<fqn>.perm`` (int64, (in,)).
Re-applying them (``load_artifacts``) reproduces the quantized weights bit for bit.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from quantlab.algorithms.gptq import (
    GPTQLayerResult,
    HessianAccumulator,
    HessianNotPositiveDefinite,
    dequantize_gidx,
    gptq_quantize_weight,
)
from quantlab.calib.budget import model_bytes
from quantlab.calib.lockstep import lockstep_forward
from quantlab.calib.sequential import BlockContext, run_sequential
from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight, from_format
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, get_mapping
from quantlab.quantizers import artifacts
from quantlab.quantizers.base import BlockwiseQuantizer, CalibratedConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)


def _gptq_format() -> QuantFormat:
    return QuantFormat(bits=4, group_size=128, symmetric=False, zero_in_range=True, symmetric_grid="full")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ settings (reference ``llama.py`` defaults, with groups of 128 as in most GPTQ checkpoints).

    Attributes:
        format: weight format. Where the format leaves them open (``null``, as every format YAML does),
            GPTQ's own conventions apply (``Quantizer.find_params``): asymmetric groups widen their range to
            include 0 (``zero_in_range=True``); symmetric groups use GPTQ's ``--sym`` grid
            (``symmetric_grid="full"``: s = 2 max|w| / (2^b - 1), z = 2^(b-1)). A format that sets another
            convention is honoured and shows in the label (``gptq w4g128a:awq-zero``).
        damp: relative dampening added to diag(H), ``damp * mean(diag H)`` (reference ``percdamp``).
        damp_increment: added to ``damp`` whenever the Cholesky factorisation fails (the value used
            is recorded per layer); 0 disables the escalation.
        max_damp: largest damping tried; beyond it the run stops with a clear error.
        block_size: lazy-batch width B of Algorithm 1 (reference 128).
        act_order: quantize columns by decreasing Hessian diagonal ("desc_act").
        static_groups: group parameters from the original weights (act_order then keeps g_idx
            monotone, free at inference); otherwise from the error-updated weights (reference).
        true_sequential: quantize a block's Linears subset by subset, each subset's Hessian collected
            with the earlier subsets quantized; False: all Hessians from the unquantized block.
    """

    format: QuantFormat = field(default_factory=_gptq_format)
    damp: float = 0.01

    damp_increment: float = 0.01
    max_damp: float = 1.0
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    default_zero_in_range: ClassVar[bool] = True
    default_symmetric_grid: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.format, QuantFormat):
            raise ConfigError("quantizer.format", f"must be a QuantFormat, got {type(self.format).__name__}")
        if not _is_number(self.damp) or not self.damp >= 0:
            raise ConfigError("quantizer.damp", f"must be a number >= 0, got {self.damp!r}")
        if not _is_number(self.damp_increment) or not self.damp_increment >= 0:
            raise ConfigError("quantizer.damp_increment", f"must be a number >= 0, got {self.damp_increment!r}")
        if not _is_number(self.max_damp) or not self.max_damp >= self.damp:
            raise ConfigError("quantizer.max_damp", f"must be a number >= damp ({self.damp!r}), got {self.max_damp!r}")
        if not is_int(self.block_size) or self.block_size < 1:
            raise ConfigError("quantizer.block_size", f"must be an integer >= 1, got {self.block_size!r}")
        for key in ("act_order", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantizer.{key}", f"must be true or false, got {getattr(self, key)!r}")


def _block_subsets(mapping: ArchMapping, block_name: str, targets: set[str]) -> list[list[str]]:
    """Relative names of one block's target Linears, grouped by shared input, in true-sequential order."""
    subsets = [[n for n in sub if f"{block_name}.{n}" in targets] for sub in mapping.sequential]
    return [s for s in subsets if s]


@register_quantizer("gptq", GPTQConfig)
class GPTQQuantizer(BlockwiseQuantizer[GPTQConfig]):
    """GPTQ on the shared calibration engine (fake quantization: dequantized weights in the model's dtype)."""

    packable = True
    offloadable = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        mapping = get_mapping(model)
        targets = set(self.block_targets(model, mapping))
        if self.config.load_artifacts:
            return self._reapply(model, targets, ctx.keep_codes)
        if calib is None:
            raise ConfigError("calib", "gptq needs calibration data")
        rows: list[dict[str, Any]] = []
        # every weight's code is kept: spilled to part files as blocks finish (a quarter of an fp32 model)
        parent = ctx.output_dir if Path(ctx.output_dir).is_dir() else None
        # held in memory up to 1/128 of the model's bytes (1 to 64 MiB) between writes
        flush = min(64 * 2**20, max(2**20, model_bytes(model) // 128))
        arts = artifacts.SpilledTensors(parent, flush_bytes=flush)
        t0 = time.perf_counter()

        def per_block(bctx: BlockContext) -> list[torch.Tensor] | None:
            subsets = _block_subsets(mapping, bctx.name, targets)
            outs = None
            if self.config.true_sequential:  # later subsets see the earlier ones quantized, one forward
                outs = self._one_pass(bctx, subsets, rows, arts)
            else:  # every Hessian from the unquantized block, in one pass
                accs = self._hessians(bctx, [names[0] for names in subsets])
                for names in subsets:
                    self._quantize_subset(bctx, names, accs.pop(names[0]), rows, arts)
            log.info("gptq: %s done (%d layers so far, %.1fs)", bctx.name, len(rows), time.perf_counter() - t0)
            return outs

        run_sequential(model, mapping, calib.tokens, per_block, device=ctx.device,
                       batch_size=self.config.batch_size, propagate="quantized", desc="gptq")
        summary = self._summary(rows, calib, time.perf_counter() - t0)
        log.info("gptq %s: %d layers, mean loss %.4g, damp max %.3g (%d escalated), %d dead columns, %.1fs",
                 self.config.format.short_name(), summary["n_layers"], summary["mean_gptq_loss"],
                 summary["damp_max"], summary["damp_escalated"], summary["dead_columns"], summary["search_s"])
        layers = [r["layer"] for r in rows]
        return QuantResult(model=model, quantized_layers=layers, artifacts=arts, summary=summary,
                           tables={"gptq_layers": rows},
                           codes=self.codes_from(arts, layers, self.config.format) if ctx.keep_codes else None)

    @staticmethod
    def codes_from(arts: Mapping[str, torch.Tensor], layers: list[str], fmt: QuantFormat) -> dict[str, QuantizedWeight]:
        """Every layer's codes, scales, zeros and g_idx as a :class:`QuantizedWeight`."""
        return {n: from_format(arts[f"{n}.qweight"], arts[f"{n}.scales"], arts[f"{n}.zeros"], fmt, arts[f"{n}.g_idx"])
                for n in layers}

    def _one_pass(self, bctx: BlockContext, subsets: list[list[str]], rows: list,
                  arts: MutableMapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """True-sequential GPTQ in ONE forward per calibration chunk (:func:`~quantlab.calib.lockstep.lockstep_forward`).

        Every chunk pauses at whichever Linear of a subset it calls first; its input is added to the subset's
        Hessian, and once all chunks are there the subset is quantized and the forwards go on with
        the quantized weights. Each later subset therefore sees the earlier ones quantized, exactly
        as in the multi-pass schedule (one early-exit pass per subset), and the forwards' results are
        the quantized block's outputs (the next block's inputs), which saves the ~2.5 block forwards
        of the early-exit passes.
        """
        first = {names[0]: names for names in subsets}
        accs: dict[str, HessianAccumulator] = {}

        def on_input(name: str, x: torch.Tensor, _kw: dict, _chunk: int) -> None:
            accs.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

        def on_barrier(name: str) -> None:
            self._quantize_subset(bctx, first[name], accs.pop(name), rows, arts)
            done.add(name)

        done: set[str] = set()
        outs = lockstep_forward(bctx, subsets, on_input, on_barrier, release_inputs=True)  # pauses at a subset's first Linear
        if len(done) != len(subsets):
            raise RuntimeError(f"{bctx.name}: subsets {[n for n in first if n not in done]} never ran")
        return outs

    @staticmethod
    def _hessians(bctx: BlockContext, names: list[str]) -> dict[str, HessianAccumulator]:
        """One Hessian per listed Linear's input, from one (early-exit) pass over the calibration chunks."""
        accs = {n: HessianAccumulator(bctx.linear(n).in_features) for n in names}
        # the accumulators' only allocations are their H, kept: the chunks' transients reuse one working set
        bctx.collect(names, lambda n, x, _kw, _chunk: accs[n].add(x), early_exit=True, reuse_heap=True)
        return accs

    def _quantize_subset(
        self, bctx: BlockContext, names: list[str], acc: HessianAccumulator, rows: list,
        arts: MutableMapping[str, torch.Tensor],
    ) -> None:
        """GPTQ every Linear of ``names`` (they share the input whose Hessian is ``acc``).

        GPTQ treats output rows independently given H (the update ``W[:, q:] -= err * U[q, q:]`` and the
        group parameters are per row; act_order's permutation comes from H), so the Linears are
        stacked into one matrix and quantized in one column loop, then split: the same algorithm with
        one loop instead of one per Linear.
        """
        cfg = self.config
        mods = [bctx.linear(rel) for rel in names]
        t = time.perf_counter()
        try:
            res = gptq_quantize_weight(
                torch.cat([m.weight.data for m in mods], dim=0), acc.take(), cfg.format, damp=cfg.damp,
                damp_increment=cfg.damp_increment, max_damp=cfg.max_damp, block_size=cfg.block_size,
                act_order=cfg.act_order, static_groups=cfg.static_groups, consume_h=True, consume_w=True,
            )  # the Hessian and the stacked weights are handed over: no copies are made
        except HessianNotPositiveDefinite as exc:
            raise ConfigError("quantizer.max_damp", f"{bctx.full_name(names[0])} (+ {len(names) - 1} sharing its input): {exc}") from None
        assert res.row_loss is not None  # gptq_quantize_weight always returns it
        r0 = 0
        for rel, mod in zip(names, mods):
            fqn, r1 = bctx.full_name(rel), r0 + mod.out_features
            part = GPTQLayerResult(res.codes[r0:r1], res.scales[r0:r1], res.zeros[r0:r1], res.g_idx, res.perm,
                                   res.weight[r0:r1], float(res.row_loss[r0:r1].sum()), res.damp, res.dead_columns)
            mod.weight.data.copy_(part.weight.to(mod.weight.dtype))
            self._store(fqn, part, arts)
            rows.append({"layer": fqn, "loss": part.loss, "damp": part.damp, "dead_columns": part.dead_columns})
            r0 = r1
        log.debug("gptq: %s loss %.4g damp %.3g (%.2fs)", names, res.loss, res.damp, time.perf_counter() - t)
        if res.damp > cfg.damp:
            log.warning("gptq: %s needed damping %.3g (configured %.3g)", names, res.damp, cfg.damp)

    @staticmethod
    def _store(fqn: str, res: GPTQLayerResult, arts: MutableMapping[str, torch.Tensor]) -> None:
        # own copies: a stacked subset's rows share storage, which safetensors refuses to save
        arts[f"{fqn}.qweight"] = res.codes.cpu().clone()
        arts[f"{fqn}.scales"] = res.scales.cpu().clone()  # float32 (float64 for a float64 model): exact re-apply
        arts[f"{fqn}.zeros"] = res.zeros.cpu().clone()
        arts[f"{fqn}.g_idx"] = res.g_idx.cpu().clone()
        if res.perm is not None:
            arts[f"{fqn}.perm"] = res.perm.cpu().clone()

    def _summary(self, rows: list[dict[str, Any]], calib: CalibData, seconds: float) -> dict[str, Any]:
        escalated = [r["layer"] for r in rows if r["damp"] > self.config.damp]
        names = ",".join(escalated[:20]) + (",..." if len(escalated) > 20 else "")
        return {
            "n_layers": len(rows),
            "damp": self.config.damp,
            "damp_max": max((r["damp"] for r in rows), default=self.config.damp),
            "damp_escalated": len(escalated),
            "damp_escalated_layers": names,
            "dead_columns": sum(r["dead_columns"] for r in rows),
            "mean_gptq_loss": sum(r["loss"] for r in rows) / max(len(rows), 1),
            "calib_tokens": calib.n_tokens,
            "search_s": round(seconds, 3),
        }

    def _reapply(self, model: nn.Module, targets: set[str], keep_codes: bool = False) -> QuantResult:
        """Set every target weight to ``dequantize_gidx`` of the saved codes (no calibration); with
        ``keep_codes`` the saved codes are returned as :attr:`QuantResult.codes`."""
        src = cast(str, self.config.load_artifacts)  # set: quantize() re-applies only then
        tensors, saved = artifacts.load_artifacts(src, self.name)
        fmt = self.config.format
        saved_fmt = saved.get("format")
        if isinstance(saved_fmt, dict):
            try:
                fmt = QuantFormat(**saved_fmt)
            except (TypeError, ConfigError):
                raise ConfigError(artifacts.KEY, f"{src}: unreadable saved format {saved_fmt!r}") from None
            if fmt != self.config.format:
                log.warning("gptq: %s was made with format %s, not %s; using the saved one",
                            src, fmt.short_name(), self.config.format.short_name())
        done = []
        codes_out: dict[str, QuantizedWeight] | None = {} if keep_codes else None
        for name in sorted(targets):
            mod = get_linear(model, name)
            codes, scales, zeros, g_idx = (artifacts.require(tensors, f"{name}.{k}", src)
                                           for k in ("qweight", "scales", "zeros", "g_idx"))
            if tuple(codes.shape) != tuple(mod.weight.shape):
                raise ConfigError(artifacts.KEY, f"{src}: {name} has shape {tuple(codes.shape)}, "
                                                 f"the model's is {tuple(mod.weight.shape)}")
            dev = mod.weight.device
            w = dequantize_gidx(codes.to(dev), scales.to(dev), zeros.to(dev), g_idx.to(dev), fmt)
            mod.weight.data.copy_(w.to(mod.weight.dtype))
            if codes_out is not None:
                codes_out[name] = from_format(codes, scales, zeros, fmt, g_idx)
            done.append(name)
        log.info("gptq: re-applied %d layers from %s", len(done), src)
        return QuantResult(model=model, quantized_layers=done, codes=codes_out,
                           summary={"n_layers": len(done), "loaded_from": str(src)})
