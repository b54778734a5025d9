"""SmoothQuant+ alpha search: ONE smoothing strength for the whole model (Pan et al. 2023, 3.1.3, 3.4.2).

For each candidate alpha of the grid (0..1, step 0.05: 21 values), every decoder block is smoothed with
eq. (6) ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` folded exactly by eq. (5)
``Y = (X diag(s)^-1)(W diag(s))^T``, its Linears are RTN-quantized, and the quantization loss of the
ENTIRE model (its final outputs against the full-precision model's, on the calibration set) is
measured; the argmin is chosen. The paper never writes this loss down: formula (4) and Figure 3 are
the output error of one Linear / one decoder layer, the whole-model aggregate is only named ("the
quantization loss of the entire model", sections 3.1.3, 3.4.1, 3.4.2; Table 4 prints its value at
the chosen alpha: 0.00449 / 0.00399 / 0.00363 for Code Llama 7B / 13B / 34B), and no reference code
was released. Every choice below compares ``h = norm_final(h_L)``, the last decoder layer's output
after the final norm, i.e. transformers' ``LlamaModel(...).last_hidden_state`` and the input of
``lm_head`` (which stays full precision), of the quantized model (``h_q``) with the fp model's
(``h_fp``) on the same calibration tokens; ``d = h_q - h_fp``, T tokens, H hidden, V vocabulary.
``LOSSES``:

* ``logits_mse`` (quantlab's default, a choice): mean over tokens and vocabulary of
  ``(W_head h_q - W_head h_fp)^2``, the error of the model's final outputs. With the Gram matrix
  ``G = W_head^T W_head`` (hidden x hidden, computed once) it equals ``sum_t d_t^T G d_t / (T V)``
  exactly (an lm_head bias cancels), so the vocabulary-sized matmul is never done (SmolLM2:
  V = 49152 vs hidden 576, 85x fewer multiply-adds than the logits).
* ``hidden_mse``: ``sum_t |d_t|^2 / (T H)``, the per-element MSE of the final hidden state. This is
  the most literal reading of "the quantization loss of the entire model" when "model" is the
  network that is quantized: the decoder stack up to its final norm, whose output is what the fp
  ``lm_head`` reads (the final norm puts it on an O(1) scale; the pre-norm residual stream would be
  dominated by its massive-activation channels). It is the same kind of per-element MSE as Table 4's
  numbers appear to be (an unverified reading). Whatever the search minimises, ``hidden_mse`` is
  also recorded for every candidate (:attr:`SearchResult.hidden_mse`; one hidden-sized square-sum).
* ``kl``: mean over tokens of KL(p_fp || p_q); needs the full logits of both models for every
  candidate (computed in slices of 1024 tokens): by far the slowest choice.

Cost model (what is done once, what per alpha):

* ONCE: the embeddings (:func:`~quantlab.calib.sequential.capture_block_inputs`); the fp forward of
  every block over the whole calibration set, which records the per-channel max |x| of every smoothed
  group's input (statistics) and ends in the fp reference (final hidden states after the final norm,
  hidden-sized, never logits); the per-channel max |W| of every group (per block); ``G``.
* PER ALPHA AND BLOCK: restore the parameters smoothing changes in place from one saved copy, fold
  ``s(alpha)``, RTN in place (:func:`~quantlab.formats.affine.fake_quantize_`), run the block on that alpha's
  hidden-state stream. Linears no group touches (o_proj unless ``smooth_vo``) are rounded once per
  block. No model copies are made.

Block-major order (the engine's): every candidate's stream advances through block ``i`` before block
``i + 1`` is touched, so each block moves to the compute device once (per wave), its originals are
saved once (one block, on the device, not a copy of the model), and the fp statistics of block ``i``
exist by the time the candidates need them, in the same pass. Memory: one block twice, the fp stream
(all calibration samples) and one stream per candidate of the search samples (``search_samples``:
the first N sequences; with variable-length data, e.g. one HumanEval prompt per sequence, those
sequences' rows of the engine's equal-length chunks, see
:func:`~quantlab.calib.sequential.first_sequences`, so row r of a search chunk is row r of the
matching fp chunk and the loss pairs every token with its own fp reference). ``alpha_batch`` bounds
the candidate streams per wave (null: as many as fit :func:`~quantlab.calib.budget.streams_that_fit`,
one for SmolLM2-135M with 32 x 256 tokens); later waves reuse the statistics and the fp reference and only
repeat the block moves. A candidate's stream is updated in place (each chunk's buffer receives the
block's output) and the fp stream's input chunks are freed as they are consumed, so only one copy of
each stream exists; the search runs under :func:`~quantlab.utils.memory.bounded_heap`, each candidate's
block forwards under :func:`~quantlab.utils.memory.repeated_allocations`. A candidate whose activations
become non-finite is dropped with loss ``inf`` instead of stopping the search.

Optionally plain RTN (no smoothing) is evaluated as one more stream, giving the loss smoothing is
compared against at the same price as one grid point.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.algorithms.smoothing import fold_group_scales, smoothquant_scales, weight_absmax_per_input
from quantlab.calib.budget import streams_that_fit
from quantlab.calib.sequential import (
    BlockContext,
    BlockData,
    Tokens,
    capture_block_inputs,
    describe_chunks,
    first_sequences,
    model_plan,
    on_device,
)
from quantlab.calib.stats import group_key, reduce_absmax
from quantlab.errors import DataError
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import ArchMapping, ScaleGroup, relative_names
from quantlab.utils.memory import bounded_heap, release_freed_memory, repeated_allocations
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)

LOSSES = ("logits_mse", "hidden_mse", "kl")
KL_SLICE_TOKENS = 1024  # tokens per logits slice of the kl loss (bounds the (tokens, vocab) temporaries)
GroupsFn = Callable[[nn.Module], list[ScaleGroup]]


# ------------------------------------------------------------------------------------- losses
def gram(head_weight: torch.Tensor) -> torch.Tensor:
    """``G = W^T W`` (hidden, hidden) of an output projection W (vocab, hidden); float32 (float64 stays)."""
    w = head_weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    return w.T @ w


def loss_sum(kind: str, h_q: torch.Tensor, h_fp: torch.Tensor, head: nn.Linear, G: torch.Tensor | None = None) -> float:
    """Sum over tokens of the per-token loss between final hidden states (post final norm) ``(..., hidden)``.

    ``logits_mse``'s per-token value is already the mean over the vocabulary, ``hidden_mse``'s the mean
    over the hidden dims. Divide by the token count for the mean. Sums are accumulated in float64.
    """
    dt = torch.float64 if h_fp.dtype == torch.float64 else torch.float32
    hq = h_q.reshape(-1, h_q.shape[-1]).to(dt)
    hf = h_fp.reshape(-1, h_fp.shape[-1]).to(dt)
    if kind == "hidden_mse":
        return float(((hq - hf) ** 2).sum(dtype=torch.float64)) / hq.shape[-1]
    if kind == "logits_mse":
        if G is None:
            raise ValueError("logits_mse needs the Gram matrix of the output projection")
        d = hq - hf
        return float(((d @ G.to(dt)) * d).sum(dtype=torch.float64)) / head.weight.shape[0]
    if kind == "kl":
        w, b = head.weight.to(dt), (cast(torch.Tensor, head.bias).to(dt)
                                    if getattr(head, "bias", None) is not None else None)
        total = 0.0
        for q, f in zip(hq.split(KL_SLICE_TOKENS), hf.split(KL_SLICE_TOKENS)):
            lp_q, lp_f = F.log_softmax(F.linear(q, w, b), dim=-1), F.log_softmax(F.linear(f, w, b), dim=-1)
            total += float(F.kl_div(lp_q, lp_f, log_target=True, reduction="sum"))
        return total
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")


# ------------------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """What the search found.

    Attributes:
        stats: ``group_key -> max|x|`` (CPU) of every smoothed group in the fp model (all samples).
        alphas: the grid, in order; ``losses`` the whole-model loss of each (``inf``: non-finite).
        rtn_loss: the loss of plain RTN without smoothing (None if not evaluated).
        n_samples / n_tokens: calibration sequences / tokens the loss was measured on.
        seconds: wall time of the whole search (statistics included).
        loss: the name of the loss in ``losses`` / ``rtn_loss`` (one of ``LOSSES``).
        hidden_mse / rtn_hidden_mse: the ``hidden_mse`` of the same candidates (== ``losses`` when
            ``loss`` is ``hidden_mse``), recorded whatever the search minimises.
    """

    stats: dict[str, torch.Tensor]
    alphas: list[float]
    losses: list[float]
    rtn_loss: float | None
    n_samples: int
    n_tokens: int
    seconds: float
    loss: str = "logits_mse"
    hidden_mse: list[float] = field(default_factory=list)
    rtn_hidden_mse: float | None = None

    @property
    def best(self) -> int:
        """Index of the smallest loss (the first one on ties)."""
        return min(range(len(self.losses)), key=lambda i: (self.losses[i], i))


def _params(block: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    return {f"{n}.{k}": p for n in sorted(names) for k, p in block.get_submodule(n).named_parameters(recurse=False)}


def _fp_stats(ctx: BlockContext, groups: list[ScaleGroup], stats: dict[str, torch.Tensor], release: bool) -> BlockData:
    """Run the untouched block on the fp stream (``ctx.inputs``), recording each group's input max |x|;
    ``release``: free each input chunk once its forward is done (not when it is also the search's start)."""
    by_first = {g.linears[0]: g for g in groups}

    def on_input(rel: str, x: torch.Tensor, _kw: dict[str, Any], _chunk: int) -> None:
        key = group_key(ctx.name, by_first[rel])
        m = reduce_absmax(x).cpu()
        stats[key] = m if key not in stats else torch.maximum(stats[key], m)

    outs = cast(list[torch.Tensor], ctx.collect(list(by_first), on_input, early_exit=False,  # never None
                                                release_inputs=release))
    return BlockData(hidden=outs, kwargs=ctx.inputs.kwargs, index=ctx.inputs.index)


class _BlockSearch:
    """One block's turn for the candidates of a wave, each on its own hidden-state stream.

    The parameters smoothing changes (group producers and consumers) are saved once and restored
    before each candidate. Target Linears no group touches (o_proj without ``smooth_vo``) are the
    same for every alpha: they are rounded once and stay rounded until :meth:`restore_all`.
    """

    def __init__(self, ctx: BlockContext, groups: list[ScaleGroup], rel_targets: list[str], fmt: QuantFormat) -> None:
        self.ctx, self.groups, self.fmt = ctx, groups, fmt
        touched = {g.prev for g in groups} | {n for g in groups for n in g.linears}
        self.rel = [r for r in rel_targets if r in touched]
        static = [r for r in rel_targets if r not in touched]
        self.params = _params(ctx.block, touched)
        self.static = _params(ctx.block, static)
        self.orig = {k: p.detach().clone() for k, p in {**self.params, **self.static}.items()}  # one block, on the device
        self.w_max = {g.key: weight_absmax_per_input([ctx.linear(n).weight for n in g.linears]) for g in groups}
        for rel in static:
            affine.fake_quantize_(ctx.linear(rel).weight.data, fmt)
        self._dirty = False

    def run(self, alpha: float | None, act: dict[str, torch.Tensor], stream: list[torch.Tensor]) -> None:
        """Smooth with ``alpha`` (None: no smoothing), round, and run the block on ``stream``, which is
        updated in place: each chunk's buffer receives the block's output, so a candidate's stream is
        allocated once per wave and the forwards' transients are all that come and go."""
        self._restore(self.params)
        self._dirty = True
        block = self.ctx.block
        if alpha is not None:
            scales = {k: smoothquant_scales(act[k].to(self.w_max[k].device), self.w_max[k], alpha) for k in self.w_max}
            fold_group_scales(block, self.groups, scales)
        for rel in self.rel:
            affine.fake_quantize_(get_linear(block, rel).weight.data, self.fmt)
        for h, kw in zip(stream, self.ctx.inputs.kwargs):
            h.copy_(self._forward(h, kw))

    def _forward(self, h: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        out = self.ctx.block(h, **kw)
        out = out[0] if isinstance(out, tuple) else out
        # one float32 sum instead of the engine's isfinite mask (3% of the search): NaN/inf propagate into it
        if not torch.isfinite(out.sum(dtype=torch.float32)):
            raise DataError(f"non-finite activations at the output of {self.ctx.name}")
        return out

    def _restore(self, params: dict[str, nn.Parameter]) -> None:
        if self._dirty:
            for k, p in params.items():
                p.data.copy_(self.orig[k])

    def restore_all(self) -> None:
        """Put every saved parameter back (the block leaves the search unchanged)."""
        self._dirty = True
        self._restore({**self.params, **self.static})
        self._dirty = False


@torch.no_grad()
def search_alpha(
    model: nn.Module, mapping: ArchMapping, tokens: Tokens, *, groups_fn: GroupsFn, targets: Iterable[str],
    alphas: list[float], fmt: QuantFormat, loss: str, device: torch.device, batch_size: int | None = None,
    search_samples: int | None = None, rtn_baseline: bool = True, alpha_batch: int | None = None,
) -> SearchResult:
    """Whole-model loss of every alpha in ``alphas`` (block-major; see the module docstring).

    The model is left with its original parameters. ``targets`` are model-level Linear names inside
    the decoder blocks (RTN-quantized for every candidate). ``tokens``: (n, seqlen) or a sequence of
    1-D tensors (variable lengths); ``search_samples``: the loss uses the first N sequences.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    plan = model_plan(model, tokens, batch_size)
    n = sum(c.index.numel() for c in plan)
    n_s = min(search_samples or n, n)
    sub = plan if n_s == n else first_sequences(plan, n_s)
    kept = [int((c.index < n_s).sum()) for c in plan]  # rows of every fp chunk the search streams hold
    fp: BlockData | None  # None after the first wave
    fp = capture_block_inputs(model, mapping, None, device=device, chunks=plan)
    start = fp if n_s == n else capture_block_inputs(model, mapping, None, device=device, chunks=sub)
    cands: list[float | None] = [*alphas, *([None] if rtn_baseline else [])]
    stream_bytes = sum(h.numel() * h.element_size() for h in start.hidden)
    wave = alpha_batch or min(len(cands), streams_that_fit(model, stream_bytes))  # null: the memory budget
    stats: dict[str, torch.Tensor] = {}
    losses: dict[int, tuple[float, float]] = {}  # candidate -> (loss, hidden_mse)
    ref: list[torch.Tensor] | None = None
    log.info("smoothquant+ search: %d candidates (%d per wave), loss %s on %s, stats on %d samples",
             len(cands), wave, loss, describe_chunks(sub), n)
    try:
        with bounded_heap():  # streams get their own mappings; the candidates' forwards reuse the heap (_pass)
            for w0 in range(0, len(cands), wave):
                idx = list(range(w0, min(w0 + wave, len(cands))))
                streams: dict[int, list[torch.Tensor] | None] = {j: [h.clone() for h in start.hidden] for j in idx}
                fp = _pass(model, mapping, groups_fn, sorted(targets), fmt, device, cands, streams, start, fp, stats)
                if ref is None:
                    assert fp is not None  # the first wave: _pass got the fp stream and returns it
                    ref = _final(model, mapping, [h[:k] for h, k in zip(fp.hidden, kept) if k], device)
                    fp = None  # the fp stream is only needed once
                losses.update(_losses(model, mapping, loss, streams, ref, device))
    finally:
        model.train(was_training)
    n_tok = start.n_tokens
    rtn = losses[len(alphas)] if rtn_baseline else (None, None)
    grid = [losses[i] for i in range(len(alphas))]
    return SearchResult(stats=stats, alphas=list(alphas), losses=[v for v, _ in grid], rtn_loss=rtn[0],
                        n_samples=n_s, n_tokens=n_tok, seconds=time.perf_counter() - t0, loss=loss,
                        hidden_mse=[h for _, h in grid], rtn_hidden_mse=rtn[1])


def _pass(model: nn.Module, mapping: ArchMapping, groups_fn: GroupsFn, targets: list[str], fmt: QuantFormat,
          device: torch.device, cands: list[float | None], streams: dict[int, list[torch.Tensor] | None],
          start: BlockData, fp: BlockData | None, stats: dict[str, torch.Tensor]) -> BlockData | None:
    """One block-major pass: fp statistics (first wave only) and every stream of this wave, block by block."""
    t0, blocks = time.perf_counter(), mapping.blocks(model)
    for i, block in enumerate(blocks):
        name = mapping.block_name(i)
        rel = relative_names(targets, name)
        with on_device([block], device, writeback=False):  # every candidate's change is restored
            groups = groups_fn(block)
            if fp is not None:  # first wave: fp statistics and the fp stream, from the untouched block
                fp = _fp_stats(BlockContext(i, name, block, fp, mapping, device), groups, stats,
                               release=fp.hidden is not start.hidden)
            act = {g.key: stats[group_key(name, g)] for g in groups}
            bs = _BlockSearch(BlockContext(i, name, block, start, mapping, device), groups, rel, fmt)
            try:
                for j, stream in streams.items():
                    if stream is None:
                        continue
                    try:
                        with repeated_allocations():  # only transients: the stream is updated in place
                            bs.run(cands[j], act, stream)
                    except DataError as exc:
                        log.warning("smoothquant+ search: alpha %s dropped at %s: %s", cands[j], name, exc)
                        streams[j] = None
            finally:
                bs.restore_all()
        release_freed_memory()
        log.info("smoothquant+ search: block %d/%d done (%d candidates, %.1fs)", i + 1, len(blocks),
                 sum(v is not None for v in streams.values()), time.perf_counter() - t0)
    return fp


def _final(model: nn.Module, mapping: ArchMapping, hidden: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    norm = model.get_submodule(mapping.final_norm)
    with on_device([norm], device, writeback=False):
        return [norm(h) for h in hidden]


def _losses(model: nn.Module, mapping: ArchMapping, kind: str, streams: dict[int, list[torch.Tensor] | None],
            ref: list[torch.Tensor], device: torch.device) -> dict[int, tuple[float, float]]:
    """Mean per-token ``kind`` loss and ``hidden_mse`` of every stream against the fp reference (final-norm
    outputs; ``inf`` for dropped streams)."""
    norm, head = model.get_submodule(mapping.final_norm), get_linear(model, mapping.lm_head)
    n_tok = sum(r.shape[0] * r.shape[1] for r in ref)
    out = {}
    with on_device([norm, head], device, writeback=False):
        G = gram(head.weight) if kind == "logits_mse" else None
        for j, stream in streams.items():
            if stream is None:
                out[j] = (math.inf, math.inf)
                continue
            total, hidden = 0.0, 0.0
            for h, r in zip(stream, ref):
                hn = norm(h)
                hs = loss_sum("hidden_mse", hn, r, head)
                hidden += hs
                total += hs if kind == "hidden_mse" else loss_sum(kind, hn, r, head, G)
            out[j] = (total / n_tok, hidden / n_tok)
            streams[j] = None  # free as we go
    return out


# ------------------------------------------------------------------------------------- plot
def plot_alpha_search(rows: list[dict[str, Any]], path: Path, loss_name: str, rtn_loss: float | None = None) -> Path:
    """Loss vs alpha (PNG, Agg canvas, no pyplot state) with the chosen alpha marked; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(r["alpha"], r["loss"]) for r in rows if math.isfinite(r["loss"])]
    best = next(r for r in rows if r["chosen"])
    fig = Figure(figsize=(5.5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([a for a, _ in pts], [v for _, v in pts], marker="o", ms=3, label="smoothing + RTN")
    ax.plot([best["alpha"]], [best["loss"]], marker="*", ms=12, color="tab:red", ls="none",
            label=f"chosen alpha = {best['alpha']:.2f}")
    if rtn_loss is not None and math.isfinite(rtn_loss):
        ax.axhline(rtn_loss, color="gray", ls="--", lw=1, label="RTN (no smoothing)")
    if pts and min(v for _, v in pts) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("smoothing strength alpha (eq. 6)")
    ax.set_ylabel(f"whole-model loss ({loss_name})")
    ax.set_title("SmoothQuant+ alpha search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
