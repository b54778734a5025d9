"""AWQ (Lin et al. 2023) on the shared calibration engine; reference ``llm-awq run_awq``, AutoAWQ for RTN.

Per decoder block, with inputs computed by the *full-precision* previous blocks (``propagate="fp"``:
no error propagation, as in the reference):

1. ONE forward over the calibration set captures, for every scaling group, the per-channel sum of
   ``|x|`` of its input (eq. 5's ``s_X``), what eq. 4's loss of its inspected module needs (a whole
   attention or MLP: see below; a Linear inspected on its own only needs ``X^T X``), and a
   fixed-stride sample of 512 input tokens of every Linear the clip search will see (one per distinct
   input: the Linears of a scaling group share theirs; the stride runs over the calibration tokens in
   the engine's chunk order, which for fixed-length data is the set's order).
2. For each group in mapping order: the fp output of the inspected module once, then for each grid
   ratio the group's weights are set to ``Q(W s)/s`` and eq. 4's loss (fp32 MSE over all output
   elements) is measured; the original weights are restored from a saved copy. The best ``s`` is
   folded exactly (:func:`~quantlab.algorithms.smoothing.fold_scales`) and the cached inputs of the
   group's Linears are divided by it (llm-awq ``apply_scale``). The search forwards go over the
   calibration tokens in batches of ``SEARCH_BATCH_TOKENS``; the loop runs under
   :func:`~quantlab.utils.memory.repeated_allocations` (one heap working set for all candidates).
3. Clip search for every target Linear except q/k (llm-awq ``auto_clip_block``), written into the
   weights; then RTN (:func:`~quantlab.formats.codes.rtn_linears_`) of the block's target Linears.

**One stream per block** (the default for a pre-norm block, :attr:`ArchMapping.residual`, when every
residual stage's norm -> module group is searched over every token). The reference keeps the input of
every inspected module and the block's outputs: four activation streams at once with the attention's
fp outputs. Here only the block's input stream ``h`` is kept; the inspected module's input is
``norm(h)``, recomputed per search batch (the same op on the same rows as the block's own forward),
and once a stage's group is searched, its fp outputs (eq. 4's reference, computed before any weight
of the stage changed) are added to ``h`` in place: ``h + attn`` is the MLP stage's stream, and
``h + attn + mlp`` the block's fp output (the same additions the block makes). The values are those
of the reference schedule (the scale and clip searches see the same inputs; the outputs differ only
where a GEMM rounds differently for another batch shape); the peak drops from four streams to two.
Otherwise (``search_tokens`` set, other architectures, groups not selected) the inspected modules'
inputs are cached and each of the block's input chunks is freed once its forward is done
(``collect(release_inputs=True)``).

Variable-length calibration data (``calib.sampling=documents``) arrives as unpadded equal-length
chunks (:func:`~quantlab.calib.sequential.plan_chunks`), so every sum and loss covers exactly the real
tokens; ``search_tokens`` then picks whole sequences by their position in the set (mean length).

Artifacts (re-applied bit for bit by ``load_artifacts``): ``awq.scale.<block>.<group key>`` (in,) and
``awq.clip.<linear>`` (out, n_groups).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from quantlab.algorithms import awq as A
from quantlab.algorithms.smoothing import fold_scales
from quantlab.calib.sequential import BlockContext, check_finite, on_device, run_sequential
from quantlab.errors import ConfigError
from quantlab.formats.codes import rtn_linears_
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, get_mapping, relative_names
from quantlab.quantizers import artifacts
from quantlab.quantizers.awq_cache import BlockCache, clip_sources, search_sequences, stream_stages
from quantlab.quantizers.base import BlockwiseQuantizer, CalibratedConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int
from quantlab.utils.memory import repeated_allocations
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)

GQA_REASON = "prev and consumer shapes differ (grouped-query attention)"


@dataclass(frozen=True)
class AWQConfig(CalibratedConfig):
    """AWQ settings; the defaults are the paper's and llm-awq's.

    Attributes:
        format: weight format (default 4-bit, groups of 128, asymmetric min/max with zero point).
        n_grid: eq. 5 grid size: alpha in 0, 1/n, ..., (n-1)/n (20: 0..0.95).
        duo_scaling: AutoAWQ's weight term ``s = s_X^a / w_mean^(1-a)`` (AutoAWQ default True; the paper
            and llm-awq: False).
        clip: run the clip search (llm-awq ``auto_clip``; q/k projections are never clipped).
        clip_n_grid / clip_max_shrink: clamp candidates ``absmax (1 - i/n)`` for ``i < max_shrink n``.
        clip_tokens: input tokens (fixed stride over the calibration set) the clip search uses.
        search_tokens: None = eq. 4's loss over every calibration token (the reference). N = only
            whole calibration sequences, evenly strided over the set, about N / (mean sequence
            length) of them (a speed option; ``s_X`` and the clip sample still use every token).
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
            v = getattr(self, key)
            if not is_int(v) or v < 1:
                raise ConfigError(f"quantizer.{key}", f"must be an integer >= 1, got {v!r}")
        for key in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"quantizer.{key}", f"must be true or false, got {getattr(self, key)!r}")
        ms = self.clip_max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 < ms < 1:
            raise ConfigError("quantizer.clip_max_shrink", f"must be a number in (0, 1), got {ms!r}")
        if int(ms * self.clip_n_grid) < 1:
            raise ConfigError("quantizer.clip_max_shrink", f"{ms} x clip_n_grid={self.clip_n_grid} leaves no candidate")
        st = self.search_tokens
        if st is not None and (not is_int(st) or st < 1):
            raise ConfigError("quantizer.search_tokens", f"must be null (every token) or an integer >= 1, got {st!r}")


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


@register_quantizer("awq", AWQConfig)
class AWQQuantizer(BlockwiseQuantizer[AWQConfig]):
    """AWQ: activation-aware scale search (eq. 4-5), clip search, then group-wise RTN."""

    packable = True
    offloadable = True

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        mapping = get_mapping(model)
        targets = set(self.block_targets(model, mapping))
        if self.config.load_artifacts:
            return self._reapply(model, mapping, targets, ctx.device, {} if ctx.keep_codes else None)
        if calib is None:
            raise ConfigError("calib", "awq needs calibration data")
        cfg = self.config
        n, lengths = calib.n_samples, calib.lengths
        keep = search_sequences(n, calib.n_tokens / n, cfg.search_tokens)
        st: dict[str, Any] = {"arts": {}, "rows": [], "skipped": {}, "clipped": 0, "one_stream": 0,
                              "ref": {} if ctx.keep_reference_weights else None,
                              "codes": {} if ctx.keep_codes else None}
        t0 = time.perf_counter()
        run_sequential(model, mapping, calib.tokens, lambda b: self._block(b, targets, keep, st), device=ctx.device,
                       batch_size=cfg.batch_size, propagate="fp", desc="awq", returns_outputs=True)
        rows = st["rows"]
        summary = {
            "n_layers": len(targets), "groups_searched": len(rows),
            "mean_best_ratio": sum(r["best_ratio"] for r in rows) / max(len(rows), 1),
            "groups_skipped": sorted(st["skipped"]), "groups_skipped_reason": dict(sorted(st["skipped"].items())),
            "layers_clipped": st["clipped"], "duo_scaling": cfg.duo_scaling, "one_stream_blocks": st["one_stream"],
            "search_tokens": calib.n_tokens if keep is None else sum(lengths[i] for i in keep.tolist()),
            "calib_tokens": calib.n_tokens, "search_s": round(time.perf_counter() - t0, 3),
        }
        log.info("awq %s: %d groups searched (mean ratio %.3f), %d layers clipped, skipped %s, %.1fs",
                 cfg.format.short_name(), len(rows), summary["mean_best_ratio"], st["clipped"],
                 summary["groups_skipped"], summary["search_s"])
        return QuantResult(model=model, quantized_layers=sorted(targets), artifacts=st["arts"], summary=summary,
                           tables={"awq_scales": rows}, reference_weights=st["ref"], codes=st["codes"])

    # ------------------------------------------------------------------ one block
    def _groups(self, block: nn.Module, mapping: ArchMapping, block_name: str, targets: set[str]
                ) -> tuple[list[ScaleGroup], dict[str, str]]:
        """The groups to search, and ``key -> reason`` for those skipped (GQA, or Linears not selected)."""
        ok = mapping.applicable_groups(block)
        skipped = {g.key: GQA_REASON for g in mapping.groups if g not in ok}
        out = []
        for g in ok:
            if all(f"{block_name}.{n}" in targets for n in g.linears):
                out.append(g)
            else:
                skipped[g.key] = "some of its Linears are not selected by include/exclude"
        return out, skipped

    def _block(self, b: BlockContext, targets: set[str], keep: torch.Tensor | None, st: dict[str, Any]
               ) -> list[torch.Tensor]:
        """Search, clip and round one block; returns its fp outputs (from the capture pass, before any change)."""
        cfg = self.config
        groups, skipped = self._groups(b.block, b.mapping, b.name, targets)
        st["skipped"].update(skipped)
        rel_t = relative_names(sorted(targets), b.name)
        stages = stream_stages(b.mapping, groups, keep)
        st["one_stream"] += stages is not None
        cache, fp_out = self._capture(b, groups, rel_t, keep, stages)
        for i, g in enumerate(groups):
            s, row = self._search_group(b, g, cache, stages)
            fold_scales(b.block, g, s)
            if g.linears[0] in cache.clip_x:  # llm-awq apply_scale: the cached input of the scaled Linears is x / s
                cache.clip_x[g.linears[0]] = [x / s.to(x) for x in cache.clip_x[g.linears[0]]]
            if all(g.inspect != later.inspect for later in groups[i + 1:]):
                cache.inputs.pop(g.inspect, None)
                cache.grams.pop(g.inspect, None)
            st["arts"][f"awq.scale.{b.name}.{g.key}"] = s.cpu()
            st["rows"].append({"block": b.name, "group": g.key, **row})
            log.debug("awq %s %s: ratio %.2f loss %.4g (ratio 0: %.4g)", b.name, g.key, row["best_ratio"],
                      row["loss_best"], row["loss_ratio0"])
        if st["ref"] is not None:  # what is clipped and rounded: the scaled fp weights
            st["ref"].update({b.full_name(r): b.linear(r).weight.detach().to("cpu", copy=True) for r in rel_t})
        samples = {src: torch.cat(xs) for src, xs in cache.clip_x.items()}
        cache.clip_x.clear()
        for rel, src in clip_sources(b.mapping, rel_t, cfg.clip).items():
            w = b.linear(rel).weight
            m = A.search_clip(w.data, samples[src], cfg.format, cfg.clip_n_grid, cfg.clip_max_shrink)
            w.data.copy_(A.apply_clip(w.data, m, cfg.format))
            st["arts"][f"awq.clip.{b.full_name(rel)}"] = m.cpu()
            st["clipped"] += 1
        rtn_linears_(b.block, rel_t, cfg.format, st["codes"], prefix=f"{b.name}.")
        if stages:  # the stream went past every stage: it is the block's fp output
            fp_out = b.inputs.hidden
            for ci, h in enumerate(fp_out):
                check_finite(h, f"the output of {b.name} (chunk {ci})")
        return fp_out

    def _capture(self, b: BlockContext, groups: list[ScaleGroup], rel_t: list[str], keep: torch.Tensor | None,
                 stages: dict[str, str] | None) -> tuple[BlockCache, list[torch.Tensor]]:
        """The single collect pass over the untouched block (module docstring, step 1).

        One-stream schedule (``stages``): the block's inputs stay (they become the stream), the stage
        modules' keyword arguments are kept, and the forward stops once the last listed module has its
        input. Otherwise early_exit=False (the down_proj input is the last thing computed): its outputs
        are the fp outputs the next block gets (``propagate="fp"``), and each input chunk is freed once
        its forward is done (the search works on the cached inputs of the inspected modules).
        """
        cfg = self.config
        gram = {g.inspect for g in groups if g.linears == (g.inspect,) and isinstance(b.module(g.inspect), nn.Linear)}
        clip = set(clip_sources(b.mapping, rel_t, cfg.clip).values())
        kw_only = set(stages or ())
        cache = BlockCache(stat_names={g.linears[0] for g in groups}, direct={g.inspect for g in groups} - gram - kw_only,
                            gram=gram, clip=clip, step=A.sample_stride(b.inputs.n_tokens, cfg.clip_tokens), keep=keep,
                            kw_only=kw_only)
        cache.offsets(b.inputs)
        names = sorted(cache.stat_names | cache.direct | cache.gram | cache.clip | kw_only)
        if stages:
            b.collect(names, cache, early_exit=True)
            return cache, []
        outs = b.collect(names, cache, early_exit=False, release_inputs=True)
        return cache, outs if outs is not None else []

    def _search_group(self, b: BlockContext, g: ScaleGroup, cache: BlockCache, stages: dict[str, str] | None
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Eq. 5's grid search for one group: ``(best s, table row)``; a stage group of the one-stream
        schedule then moves the stream past its stage (``h += module(norm(h))``, fp values)."""
        cfg = self.config
        stream: list | None = None
        lins = [b.linear(n) for n in g.linears]
        orig = [lin.weight.data.clone() for lin in lins]
        x_mean = cache.abs_sum[g.linears[0]] / cache.n_tokens
        w_mean = A.weight_mean(orig, cfg.format) if cfg.duo_scaling else None
        if g.inspect in cache.gram:
            gram, n_tok = cache.grams[g.inspect], cache.gram_tokens[g.inspect]

            def loss_of(s: torch.Tensor) -> float:
                return A.quadratic_loss(A.scaled_fake_quant(orig[0], s, cfg.format), orig[0], gram, n_tok)
        else:
            mod = b.module(g.inspect)
            if stages and g.inspect in stages:
                norm = b.module(stages[g.inspect])
                batches = stream = cache.stream_batches(b.inputs.hidden, g.inspect)

                def fwd(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
                    return _out(mod(norm(x), **kw))
            else:
                batches = cache.inputs[g.inspect]

                def fwd(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
                    return _out(mod(x, **kw))
            refs = [fwd(x, kw) for x, kw in batches]  # eq. 4's reference: the fp outputs, once
            loss_of = self._module_loss(fwd, lins, orig, batches, refs)
        losses: list[float] = []
        best: tuple[float, float, torch.Tensor | None] = (float("inf"), -1.0, None)
        try:
            with repeated_allocations():  # the candidates' forwards reuse one working set (utils.memory)
                for r in A.grid_ratios(cfg.n_grid):
                    s = A.candidate_scales(x_mean, r, w_mean)
                    losses.append(loss_of(s))
                    if losses[-1] < best[0]:  # strict: ties keep the smaller ratio, NaN never wins
                        best = (losses[-1], r, s)
        finally:
            for lin, w0 in zip(lins, orig):
                lin.weight.data.copy_(w0)
        if best[2] is None:
            raise FloatingPointError(f"awq: no finite scale-search loss for {b.name}.{g.key} (losses {losses[:3]}...)")
        if stream is not None:  # the block's own residual addition, on the same values
            for (x, _kw), ref in zip(stream, refs):
                x.add_(ref)
        return best[2], {"best_ratio": best[1], "loss_best": best[0], "loss_ratio0": losses[0]}

    def _module_loss(self, fwd: Any, lins: list[nn.Linear], orig: list[torch.Tensor], batches: list,
                     refs: list[torch.Tensor]):
        """Eq. 4 through the inspected module ``fwd``: per candidate ``mean((f(X; Q(Ws)/s) - f(X; W))^2)``,
        ``refs`` the fp outputs ``f(X; W)`` of ``batches``."""
        fmt = self.config.format
        dt = A.compute_dtype(orig[0])
        numel = sum(r.numel() for r in refs)

        def loss_of(s: torch.Tensor) -> float:
            for lin, w0 in zip(lins, orig):
                lin.weight.data.copy_(A.scaled_fake_quant(w0, s, fmt))
            total = 0.0
            for (x, kw), ref in zip(batches, refs):
                out = fwd(x, kw)
                d = out.sub_(ref) if out.dtype == dt else out.to(dt).sub_(ref.to(dt))
                total += float(torch.dot(d.view(-1), d.view(-1)))
            return total / numel

        return loss_of

    # ------------------------------------------------------------------ re-apply saved artifacts
    def _reapply(self, model: nn.Module, mapping: ArchMapping, targets: set[str], device: torch.device,
                 codes: dict | None) -> QuantResult:
        src = cast(str, self.config.load_artifacts)  # set: quantize() re-applies only then
        tensors, _saved = artifacts.load_artifacts(src, self.name)
        fmt = self.config.format
        n_clip = 0
        for i, block in enumerate(mapping.blocks(model)):
            name = mapping.block_name(i)
            with on_device([block], device):
                groups, _ = self._groups(block, mapping, name, targets)
                for g in groups:
                    fold_scales(block, g, artifacts.require(tensors, f"awq.scale.{name}.{g.key}", src))
                rel_t = relative_names(sorted(targets), name)
                for rel in rel_t:
                    clip = tensors.get(f"awq.clip.{name}.{rel}")
                    if clip is not None:
                        w = get_linear(block, rel).weight
                        w.data.copy_(A.apply_clip(w.data, clip, fmt))
                        n_clip += 1
                rtn_linears_(block, rel_t, fmt, codes, prefix=f"{name}.")
        log.info("awq: re-applied scales and %d clips from %s", n_clip, src)
        return QuantResult(model=model, quantized_layers=sorted(targets), codes=codes,
                           summary={"n_layers": len(targets), "layers_clipped": n_clip, "loaded_from": str(src)})
