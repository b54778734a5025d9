"""The one calibration engine: block-by-block passes over a calibration set.

Every calibrated method (GPTQ, AWQ, SmoothQuant, SmoothQuant+) uses :func:`run_sequential`
instead of writing its own loop (the GPTQ reference copies a ``Catcher`` + loop into every
``<model>.py``; llm-compressor's ``pipelines/sequential`` is the model this follows):

1. :func:`capture_block_inputs` runs the embeddings once per calibration chunk and stops at the
   first decoder block (a forward pre-hook raises), keeping the block's hidden-state input and the
   keyword arguments the model passes to it (rotary position embeddings, attention mask), which the
   model computes for that chunk's own shape.
2. For each block in order: the block is moved to the compute device (the rest of the model may
   stay on CPU, so a model larger than accelerator memory still quantizes), the method's callback
   gets a :class:`BlockContext` (hooks for statistics/Hessians, forwards over all chunks), then the
   block's outputs become the next block's inputs and the block goes back where it was.
   ``propagate="quantized"`` (GPTQ, llm-compressor) computes those outputs *after* the callback
   quantized the block, so errors propagate; ``propagate="fp"`` (AWQ reference ``run_awq``)
   computes them *before*, from the untouched block.

Chunks (:func:`plan_chunks`): fixed-length data, an (n, seqlen) tensor, is cut into consecutive
batches of ``batch_size`` rows (default: as many as fit the model's activation budget,
:func:`quantlab.calib.budget.chunk_tokens`). Variable-length data, a
sequence of 1-D tensors (``calib.sampling=documents``: every document its own sequence, as
SmoothQuant+ feeds each HumanEval prompt on its own), is grouped by length and every chunk holds
sequences of ONE length (longest lengths first, source order inside a length, at most ``batch_size``
sequences or the token budget per chunk; a single longer sequence is a chunk of its own). No
padding exists, so every statistic (Hessians, max |x|, sums, losses) sees exactly the real tokens,
with no attention mask to honour and no position to exclude; a chunk is an ordinary unpadded batch,
so the model's causal attention never crosses sequences and its rotary embeddings / masks are those
of that length. The price is more, smaller forwards when lengths are all distinct (HumanEval: 111
to 142 distinct lengths for 164 prompts), which is cheap next to padding bookkeeping in every method.
:attr:`BlockData.index` records which calibration sequences each chunk holds.

Memory is bounded by one block, the calibration activations (one hidden state per token, inputs and
outputs) and one chunk's transient activations (the budget).
Non-finite activations stop the run with a :class:`~quantlab.errors.DataError` naming the block.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from quantlab.calib.chunks import (  # noqa: F401  (re-exported: the engine's public names)
    Chunk,
    Tokens,
    auto_batch_size,
    describe_chunks,
    first_sequences,
    model_plan,
    plan_chunks,
)
from quantlab.errors import DataError
from quantlab.models.mappings import ArchMapping
from quantlab.models.offload import execution_device, is_offloaded, materialized
from quantlab.utils.memory import bounded_heap, release_freed_memory, repeated_allocations
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)

# fn(name, x, kwargs, chunk): x is the module's (first) input, kwargs its keyword arguments
InputFn = Callable[[str, torch.Tensor, dict[str, Any], int], None]


class _StopForward(Exception):
    """Raised inside a hook to end a forward early (everything needed was captured)."""


@dataclass
class BlockData:
    """Inputs of one decoder block for every calibration chunk.

    Attributes:
        hidden: per chunk, the hidden states (batch, seq, hidden) on the compute device.
        kwargs: per chunk, the keyword arguments the model passes to its decoder blocks (computed
            by the model for that chunk's shape: rotary embeddings, mask, position ids).
        index: per chunk, the int64 (batch,) positions of its sequences in the calibration set
            (:attr:`Chunk.index`; CPU).
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    index: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        """Real tokens over all chunks (chunks are never padded)."""
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _first_input(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Split a module call into its hidden-state input and the remaining keyword arguments."""
    if args:
        return args[0], dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), rest


def _block_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    kw["use_cache"] = False
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    return kw


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise :class:`DataError` if ``t`` holds NaN or inf (``where`` names the place).

    A NaN or inf anywhere makes the sum non-finite, so one reduction clears the common case (measured
    here on a 4x256x1536 float32 tensor: 81 us vs 3.4 ms for ``isfinite(t).all()``); only a non-finite
    sum (a real NaN/inf, or finite values that overflow when added) takes the exact check. Half-precision
    activations are summed in float32 (their sum would overflow float16 long before any value does).
    """
    half = t.dtype in (torch.float16, torch.bfloat16)
    if torch.isfinite(t.sum(dtype=torch.float32) if half else t.sum()):
        return
    if not torch.isfinite(t).all():
        n_bad = int((~torch.isfinite(t)).sum())
        raise DataError(
            f"non-finite calibration activations ({n_bad} NaN/inf values) at {where}; "
            "check the model dtype (fp16 overflow?) and the calibration tokens"
        )


@contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device, *, writeback: bool = True) -> Iterator[None]:
    """Temporarily move ``modules`` to ``device`` (no-op when they are already there).

    Offloaded modules (``model.offload=disk``) are read onto ``device`` instead, and with ``writeback``
    their parameters are written back to the offload on leaving (:func:`quantlab.models.offload.materialized`);
    pass ``writeback=False`` for read-only passes. Every weight change of a method happens inside this
    context, so it reaches the offloaded model.
    """
    if any(is_offloaded(m) for m in modules):
        with materialized(modules, device, writeback=writeback):
            yield
        return
    homes = []
    for m in modules:
        p: torch.Tensor | None = next(iter(m.parameters()), None)
        p = p if p is not None else next(iter(m.buffers()), None)
        homes.append(p.device if p is not None else device)
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, mapping: ArchMapping, tokens: Tokens | None, *, device: torch.device,
    batch_size: int | None = None, chunks: Sequence[Chunk] | None = None,
) -> BlockData:
    """Run the embeddings chunk by chunk and capture the first block's inputs.

    Args:
        tokens: (n, seqlen) tensor or sequence of 1-D tensors, cut by :func:`plan_chunks`
            (ignored when ``chunks`` is given).
        batch_size: sequences per chunk (None: the model's activation budget).
        chunks: a ready plan (e.g. :func:`first_sequences` of another).
    """
    plan = list(chunks) if chunks is not None else model_plan(model, cast(Tokens, tokens), batch_size)
    first = mapping.blocks(model)[0]
    data = BlockData(hidden=[], index=[c.index for c in plan])

    def catch(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x, rest = _first_input(args, kwargs)
        data.hidden.append(x.detach())
        data.kwargs.append(_block_kwargs(rest))
        raise _StopForward

    pre = [model.get_submodule(p) for p in mapping.pre_blocks]
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with on_device(pre, device, writeback=False):
            for chunk in plan:
                try:
                    model(input_ids=chunk.tokens.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover - the hook always fires for a decoder-only model
                    raise RuntimeError(f"{mapping.layers}[0] was never called")
    finally:
        handle.remove()
    for i, h in enumerate(data.hidden):
        check_finite(h, f"the embeddings (chunk {i})")
    return data


def _no_input(_name: str, _x: torch.Tensor, _kw: dict[str, Any], _chunk: int) -> None:
    """The :data:`InputFn` of a plain forward (no module is watched)."""


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockContext:
    """What a method's per-block callback sees.

    Attributes:
        index: block index.
        name: the block's module path, e.g. ``model.layers.3``.
        block: the decoder block, on ``device``.
        inputs: the block's inputs for every calibration chunk.
        mapping: the architecture mapping.
        device: compute device.
    """

    index: int
    name: str
    block: nn.Module
    inputs: BlockData
    mapping: ArchMapping
    device: torch.device

    def release_inputs(self) -> None:
        """Free the block's input hidden states now instead of when the block is done.

        For a callback that returns the block's outputs (``run_sequential(returns_outputs=True)``) and
        runs nothing more over its inputs, e.g. AWQ after its capture pass: one activation stream less
        during its search. ``inputs.hidden`` is empty afterwards (``inputs.kwargs`` stay).
        """
        self.inputs.hidden.clear()  # the engine's list: the tensors go with it

    def module(self, rel: str) -> nn.Module:
        """Submodule by name relative to the block."""
        return self.block.get_submodule(rel)

    def linear(self, rel: str) -> nn.Linear:
        """:meth:`module` typed as the Linear that it is (not checked)."""
        return get_linear(self.block, rel)

    def full_name(self, rel: str) -> str:
        """Model-level name of a block submodule, e.g. ``model.layers.3.mlp.up_proj``."""
        return f"{self.name}.{rel}"

    @torch.no_grad()
    def forward(self, *, release_inputs: bool = False, reuse_heap: bool = False) -> list[torch.Tensor]:
        """The block's outputs for every chunk (with its current weights).

        ``release_inputs``: each input chunk is freed once its forward is done (as in :meth:`collect`), so
        the input and output streams are never both whole: for the engine's last pass over a finished block.
        ``reuse_heap``: as in :meth:`collect`.
        """
        return cast(list[torch.Tensor], self.collect([], _no_input, early_exit=False, release_inputs=release_inputs,
                                                     reuse_heap=reuse_heap))

    @torch.no_grad()
    def collect(self, names: Sequence[str], fn: InputFn, early_exit: bool = True, *,
                release_inputs: bool = False, reuse_heap: bool = False) -> list[torch.Tensor] | None:
        """Run every chunk through the block, calling ``fn`` with the input of each module in ``names``.

        With ``early_exit`` the forward of a chunk stops as soon as every listed module has
        received its input (later layers are not computed), so collecting the inputs of early
        modules costs only the part of the block before them. Without it, the block's outputs
        (one per chunk, computed with the weights as they were during the pass) are returned, so a
        method that does not change the block inside ``fn`` can reuse them instead of a second pass.
        ``release_inputs``: :meth:`release_inputs` chunk by chunk, each input freed once its forward
        is done, so the input and output streams are never both whole (same values).
        ``reuse_heap``: the pass runs under :func:`~quantlab.utils.memory.repeated_allocations`, so every
        chunk's transient activations come from one heap working set instead of fresh page-faulted
        mappings (same values). For a pass that keeps nothing but the outputs and what ``fn`` adds to
        accumulators: GPTQ's passes at llm-compressor's schedule (``true_sequential=false``; SmolLM2-135M,
        32 x 256 tokens, ``scripts/bench_peers.py``, 2026-12-08: 1.12-1.30M minor page faults instead of
        6.6M, 0.36-0.48x llm-compressor's time instead of 0.55-0.66x, the RSS increase 0.14-0.16 GiB
        instead of 0.10). The other methods' passes keep per-tensor mappings, as their memory was measured.
        """
        mods = {n: self.block.get_submodule(n) for n in names}
        with repeated_allocations() if reuse_heap else nullcontext():
            return self._collect(mods, fn, early_exit, release_inputs)

    def _collect(self, mods: dict[str, nn.Module], fn: InputFn, early_exit: bool,
                 release_inputs: bool) -> list[torch.Tensor] | None:
        outs: list[torch.Tensor] = []
        for ci, (h, kw) in enumerate(zip(self.inputs.hidden, self.inputs.kwargs)):
            fired: set[str] = set()

            def make(n: str):
                def pre(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                    x, rest = _first_input(args, kwargs)
                    check_finite(x, f"the input of {self.name}.{n} (chunk {ci})")
                    fn(n, x, rest, ci)
                    fired.add(n)
                    if early_exit and len(fired) == len(mods):
                        raise _StopForward

                return pre

            handles = [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in mods.items()]
            try:
                out = _block_output(self.block(h, **kw))
                check_finite(out, f"the output of {self.name} (chunk {ci})")
                outs.append(out)
            except _StopForward:
                pass
            finally:
                for hd in handles:
                    hd.remove()
            if release_inputs:
                self.inputs.hidden[ci] = h.new_empty(0)  # freed with the loop's reference, next chunk
            missing = set(mods) - fired
            if missing:
                raise RuntimeError(f"{self.name}: modules {sorted(missing)} were not called in the block's forward")
        if release_inputs:
            self.release_inputs()
        return None if early_exit else outs


# A callback may return the block's outputs (one tensor per chunk, computed with its final weights),
# which saves the engine a forward pass when propagate="quantized".
BlockFn = Callable[[BlockContext], "list[torch.Tensor] | None"]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    mapping: ArchMapping,
    tokens: Tokens,
    fn: BlockFn,
    *,
    device: torch.device,
    batch_size: int | None = None,
    propagate: str = "quantized",
    desc: str = "calibrate",
    writeback: bool = True,
    returns_outputs: bool = False,
) -> None:
    """Call ``fn`` on every decoder block in order, feeding each block's outputs to the next.

    Args:
        model: a decoder-only HF model covered by ``mapping``.
        mapping: its architecture mapping.
        tokens: calibration token ids, (n_samples, seqlen) or a sequence of 1-D tensors of any lengths
            (chunked by :func:`plan_chunks`: equal lengths together, no padding).
        fn: per-block callback; may change the block's weights in place, and may return the block's
            outputs for every chunk (with its final weights) to save a forward pass.
        device: compute device; each block is moved there for its turn and moved back afterwards.
        batch_size: sequences per forward chunk (None: as many as fit the model's activation budget).
        propagate: ``quantized`` = next inputs come from the block after ``fn`` (errors propagate);
            ``fp`` = from the block before ``fn``.
        writeback: ``fn`` may change the blocks (an offloaded model gets them written back); False for
            statistics-only passes.
        returns_outputs: ``fn`` always returns the outputs ``propagate`` asks for; with ``propagate="fp"``
            they are the block's outputs BEFORE ``fn`` changed it (e.g. from a statistics pass it made
            anyway), which saves the engine's own fp forward.

    Blocks are calibrated under :func:`quantlab.utils.memory.bounded_heap` (large transients never
    settle in glibc's heap: GPTQ on SmolLM2 1.31x vs 1.53x the model's bytes, 60.6 s vs 55.1 s, before
    the GPTQ solver work); a callback that repeats many forwards per block (AWQ's grid search) wraps
    that loop in :func:`~quantlab.utils.memory.repeated_allocations`, and a pass may ask for it
    (``BlockContext.collect(reuse_heap=True)``; the engine's own last pass over a block does).
    ``QUANTLAB_HEAP_TUNING=0``: off.
    """
    if propagate not in ("quantized", "fp"):
        raise ValueError(f"propagate must be 'quantized' or 'fp', got {propagate!r}")
    was_training = model.training
    model.eval()
    plan = model_plan(model, tokens, batch_size)
    data = capture_block_inputs(model, mapping, None, device=device, chunks=plan)
    blocks = mapping.blocks(model)
    log.info("%s: %d blocks, %s on %s", desc, len(blocks), describe_chunks(plan), device)
    try:
        with bounded_heap():  # transients never settle in the heap (utils.memory; QUANTLAB_HEAP_TUNING=0: off)
            for i, block in enumerate(blocks):
                dev = execution_device(block, device)  # a block sharded onto another GPU is computed there
                if data.hidden and data.hidden[0].device != dev:
                    data = BlockData([h.to(dev) for h in data.hidden], [_to(kw, dev) for kw in data.kwargs], data.index)
                with on_device([block], dev, writeback=writeback):
                    ctx = BlockContext(i, mapping.block_name(i), block, data, mapping, dev)
                    fp_out = ctx.forward() if propagate == "fp" and not returns_outputs else None
                    ret = fn(ctx)
                    if returns_outputs and ret is None:
                        raise RuntimeError(f"{desc}: the block callback returned no outputs for {ctx.name}")
                    # the block is done: its last forward frees each input chunk as it goes
                    outs = fp_out if fp_out is not None else (
                        ret if ret is not None else ctx.forward(release_inputs=True, reuse_heap=True))
                data = BlockData(hidden=outs, kwargs=data.kwargs, index=data.index)
                del ctx, fp_out, ret, outs
                release_freed_memory()  # the block's transients, back to the OS (utils.memory)
                log.debug("%s: block %d/%d done", desc, i + 1, len(blocks))
    finally:
        model.train(was_training)
