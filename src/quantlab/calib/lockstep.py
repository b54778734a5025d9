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
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from quantlab.calib.sequential import BlockContext, InputFn, _block_output, _first_input, check_finite


class LockstepError(RuntimeError):
    """The chunks did not reach the same barriers in the same order."""


@torch.no_grad()
def lockstep_forward(ctx: BlockContext, barriers: Sequence[Sequence[str]], on_input: InputFn,
                     on_barrier: Callable[[str], None]) -> list[torch.Tensor]:
    """Run every chunk of ``ctx.inputs`` through ``ctx.block`` in lockstep at ``barriers``.

    Args:
        ctx: the block and its inputs (one entry per chunk).
        barriers: groups of block-relative module names (e.g. the Linears sharing one input); a group
            pauses every chunk at the FIRST call of any of its modules in that chunk's forward (later
            calls, and modules not listed, run freely). A group is named by its first entry.
        on_input: ``fn(group name, x, kwargs, chunk)`` with the input of the module that was called, as
            each chunk arrives.
        on_barrier: ``fn(group name)`` once every chunk has arrived at that barrier; may change the block.

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
            del x, rest
            main.switch(("at", name))  # pause this chunk until the barrier opens

        return pre

    def run(ci: int) -> tuple[str, torch.Tensor]:
        with torch.no_grad():
            out = _block_output(ctx.block(ctx.inputs.hidden[ci], **ctx.inputs.kwargs[ci]))
        check_finite(out, f"the output of {ctx.name} (chunk {ci})")
        return ("done", out)

    outs: list[torch.Tensor | None] = [None] * n_chunks
    handles = [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in mods.items()]
    lets = []
    try:
        for ci in range(n_chunks):
            g = greenlet(lambda ci=ci: run(ci))
            chunk_of[g] = ci
            lets.append(g)
        pending = list(range(n_chunks))
        while pending:
            stops = {ci: lets[ci].switch() for ci in pending}
            at = {v for kind, v in stops.values() if kind == "at"}
            finished = [ci for ci, (kind, _) in stops.items() if kind == "done"]
            if len(at) > 1 or (at and finished):
                where = {ci: (v if kind == "at" else "the end") for ci, (kind, v) in stops.items()}
                raise LockstepError(f"{ctx.name}: calibration chunks took different paths through the block: {where}")
            for ci in finished:
                outs[ci] = stops[ci][1]
            del stops
            if at:
                on_barrier(at.pop())
            pending = [ci for ci in pending if outs[ci] is None]
    finally:
        for h in handles:
            h.remove()
        for g in lets:  # a failed run leaves paused chunks: end them (GreenletExit unwinds their frames)
            if not g.dead:
                g.throw()
    return outs  # type: ignore[return-value]
