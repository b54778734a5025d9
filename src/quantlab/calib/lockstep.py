"""Lockstep forward: every calibration chunk through one block, all paused at the same barriers.

A method that changes a block *while* the calibration data flows through it (true-sequential GPTQ:
q/k/v are quantized before o_proj's Hessian is taken, o_proj before the MLP's, ...) needs, at each
such point, the inputs of ALL calibration tokens, computed with everything before that point
already changed. With the whole set in one chunk that is one forward with pre-hooks; with the set
cut into chunks (bounded activation memory, see :mod:`quantlab.calib.budget`) the simple schedule is
one early-exit pass per barrier, which recomputes the front of the block again and again.

:func:`lockstep_forward` keeps ONE forward per chunk: each chunk's forward runs in its own greenlet
(a coroutine on the calling thread, so torch's thread-local state such as ``no_grad`` is shared)
and stops at the first call of each barrier module; ``on_input`` sees that chunk's input there.
When every chunk has reached the barrier, ``on_barrier`` runs once (e.g. quantizes the Linears of
that subset) and all chunks resume. The results are exactly those of the multi-pass schedule: each
barrier's inputs are computed with every earlier barrier's change applied, chunk by chunk in the
same order. Memory: at a barrier each chunk holds the live tensors of its own forward at that point
(for a Llama MLP: the residual, the normed input and ``act(gate) * up``), i.e. about the full set's
activations at that point, but never the transient peaks inside one op for the whole set at once.

The block's tail (:func:`residual_tail`): when the last barrier is the Linear whose output the
block's last residual stage returns (Llama: ``down_proj``; ``ArchMapping.residual`` and ``outputs``
say so as data), a chunk that arrives there does not pause: it keeps only the stage's residual (the
norm's input) and the Linear's input, and its forward ends, which frees its frame (the normed input)
and, with ``release_inputs``, its block input. After the barrier its output is computed as HF's
decoder layer does, ``residual + linear(x)``. Chunk 0 still runs its whole forward, and its output
must equal that sum bit for bit (else :class:`LockstepError`), so a mapping that does not describe the
block is caught in its first block. SmolLM2 (8 chunks of 4 x 256 tokens, fp32; from the tensors'
sizes): 8.7 MB per chunk at ``down_proj`` instead of 13.5 MB.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from quantlab.calib.sequential import BlockContext, InputFn, _block_output, _first_input, check_finite
from quantlab.models.mappings import ArchMapping


class LockstepError(RuntimeError):
    """The chunks did not reach the same barriers in the same order."""


class _TailExit(Exception):
    """Ends a chunk's forward at the block's tail Linear (its output is computed after the barrier)."""


def residual_tail(mapping: ArchMapping | None, barriers: Sequence[Sequence[str]]) -> tuple[str, str] | None:
    """``(norm, linear)`` when the block's output is ``norm's input + linear(x)`` and the last barrier is
    ``linear`` alone (its last residual stage's module returns that Linear's output); else None."""
    if mapping is None or not mapping.residual or not barriers:
        return None
    norm, module = mapping.residual[-1]
    linear = dict(mapping.outputs).get(module)
    return (norm, linear) if linear is not None and list(barriers[-1]) == [linear] else None


@torch.no_grad()
def lockstep_forward(ctx: BlockContext, barriers: Sequence[Sequence[str]], on_input: InputFn,
                     on_barrier: Callable[[str], None], *, release_inputs: bool = False) -> list[torch.Tensor]:
    """Run every chunk of ``ctx.inputs`` through ``ctx.block`` in lockstep at ``barriers``.

    Args:
        ctx: the block and its inputs (one entry per chunk).
        barriers: groups of block-relative module names (e.g. the Linears sharing one input); a group
            pauses every chunk at the FIRST call of any of its modules in that chunk's forward (later
            calls, and modules not listed, run freely). A group is named by its first entry.
        on_input: ``fn(group name, x, kwargs, chunk)`` with the input of the module that was called, as
            each chunk arrives.
        on_barrier: ``fn(group name)`` once every chunk has arrived at that barrier; may change the block.
        release_inputs: free a chunk's block input once its forward has ended at the block's tail (the
            caller runs nothing more over the inputs, e.g. the engine's last pass).

    Returns:
        The block's output for every chunk (computed with the changes made at the barriers).

    Raises:
        LockstepError: a chunk reached another barrier than the others, or finished while others wait.
    """
    from greenlet import getcurrent, greenlet

    main = getcurrent()
    group_of = {n: group[0] for group in barriers for n in group}
    mods = {n: ctx.block.get_submodule(n) for n in group_of}
    n_chunks = len(ctx.inputs.hidden)
    passed: list[set[str]] = [set() for _ in range(n_chunks)]
    chunk_of: dict[Any, int] = {}
    tail = residual_tail(ctx.mapping, barriers)
    tail_norm, tail_linear = tail or ("", "")
    kept: dict[int, list[torch.Tensor]] = {}  # chunk -> [the tail stage's residual, the tail Linear's input]

    def keep_residual(_mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ci = chunk_of.get(getcurrent())
        if ci is not None and ci not in kept:
            kept[ci] = [_first_input(args, kwargs)[0]]

    def tail_output(ci: int) -> torch.Tensor:
        """``residual + linear(x)``: the decoder layer's last line, after the tail Linear was changed."""
        residual, x = kept.pop(ci)
        out = residual + ctx.block.get_submodule(tail_linear)(x)
        check_finite(out, f"the output of {ctx.name} (chunk {ci})")
        return out

    def make(module_name: str):
        name = group_of[module_name]

        def pre(_mod: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            ci = chunk_of.get(getcurrent())
            if ci is None or name in passed[ci]:
                return
            x, rest = _first_input(args, kwargs)
            check_finite(x, f"the input of {ctx.name}.{module_name} (chunk {ci})")
            on_input(name, x, rest, ci)
            passed[ci].add(name)
            if name == tail_linear:
                if len(kept.get(ci, ())) != 1:
                    raise LockstepError(f"{ctx.name}: {tail_linear} ran before {tail_norm} (chunk {ci})")
                kept[ci].append(x)
                if ci > 0:  # chunk 0 runs on: its output checks the sum
                    raise _TailExit
            del x, rest
            main.switch(("at", name))  # pause this chunk until the barrier opens

        return pre

    def run(ci: int) -> tuple[str, Any]:
        try:
            with torch.no_grad():
                out = _block_output(ctx.block(ctx.inputs.hidden[ci], **ctx.inputs.kwargs[ci]))
        except _TailExit:  # the frames are gone: only the kept residual and input remain
            if release_inputs:
                ctx.inputs.hidden[ci] = ctx.inputs.hidden[ci].new_empty(0)
            return ("tail", tail_linear)
        check_finite(out, f"the output of {ctx.name} (chunk {ci})")
        return ("done", out)

    outs: list[torch.Tensor | None] = [None] * n_chunks
    handles = [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in mods.items()]
    if tail is not None:
        handles.append(ctx.block.get_submodule(tail_norm).register_forward_pre_hook(keep_residual, with_kwargs=True))
    lets = []
    try:
        for ci in range(n_chunks):
            g = greenlet(lambda ci=ci: run(ci))
            chunk_of[g] = ci
            lets.append(g)
        pending = list(range(n_chunks))
        while pending:
            stops = {ci: lets[ci].switch() for ci in pending}
            at = {v for kind, v in stops.values() if kind != "done"}
            finished = [ci for ci, (kind, _) in stops.items() if kind == "done"]
            if len(at) > 1 or (at and finished):
                where = {ci: (v if kind != "done" else "the end") for ci, (kind, v) in stops.items()}
                raise LockstepError(f"{ctx.name}: calibration chunks took different paths through the block: {where}")
            for ci in finished:
                out = outs[ci] = stops[ci][1]
                if ci in kept and not torch.equal(tail_output(ci), out):
                    raise LockstepError(f"{ctx.name}: the block's output is not {tail_norm}'s input + {tail_linear}'s "
                                        f"output (chunk {ci}): the mapping's residual/outputs do not describe this block")
            ended = [ci for ci, (kind, _) in stops.items() if kind == "tail"]
            del stops
            if at:
                on_barrier(at.pop())
            for ci in ended:
                outs[ci] = tail_output(ci)
            pending = [ci for ci in pending if outs[ci] is None]
    finally:
        for h in handles:
            h.remove()
        for g in lets:  # a failed run leaves paused chunks: end them (GreenletExit unwinds their frames)
            if not g.dead:
                g.throw()
    return outs  # type: ignore[return-value]
