"""Models larger than memory: weights offloaded to disk, one decoder block materialized at a time.

``model.offload=disk`` loads the model through compressed-tensors' offloading (the library
llm-compressor uses, :mod:`compressed_tensors.offload`): transformers + accelerate build the model on
the meta device with ``device_map="disk"``, then every parameter and buffer becomes an entry of a
``DiskCache`` in ``model.offload_folder`` (a symlink to the checkpoint's safetensors file, no copy).
A module reads its tensors from disk when it runs and drops them afterwards, so evaluation works
unchanged, reading the model from disk (or the page cache) once per forward.

The calibration engine's :func:`~quantlab.calib.sequential.on_device` calls :func:`materialized`
for its blocks: the whole block is read onto the compute device for its turn (compressed-tensors'
``align_module_device``: every tensor read once and kept), and on leaving, every parameter of the
block is written back (``update_offload_parameter``: a new safetensors file per tensor in the offload
folder) before it is released and the next block is read. The quantized model is then the offload
folder. Peak memory is one block, the calibration activations and the embeddings while they run,
not the model (``scripts/bench_offload.py`` measures it). Quantizing offloaded gives bit-for-bit the
weights of the in-memory run (``tests/test_offload.py``): the same operations on the same values.

Only quantizers that do every weight change inside :func:`~quantlab.calib.sequential.on_device`
declare ``offloadable`` (a change made elsewhere would land on a temporary copy and be lost); the
others are refused with one error naming ``model.offload``.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("disk",)


def _offloaded(module: nn.Module) -> bool:
    from compressed_tensors.offload.cache import OffloadCache

    return isinstance(module._parameters, OffloadCache)


def is_offloaded(model: nn.Module) -> bool:
    """True when any module of ``model`` keeps its tensors in a compressed-tensors offload cache."""
    return any(_offloaded(m) for m in model.modules())


@contextlib.contextmanager
def materialized(modules: Sequence[nn.Module], device: torch.device, writeback: bool = True) -> Iterator[None]:
    """Hold every tensor of ``modules`` (offloaded ones) on ``device`` for the duration of the block.

    With ``writeback``, every parameter of those modules is written back to the offload when the
    block ends without an exception (the caller may have changed them in place or by assignment);
    without it (read-only passes: statistics, searches that restore what they change) nothing is
    written. Modules that are not offloaded are left alone.
    """
    from compressed_tensors.offload import align_module_device, disk_load_context, update_offload_parameter

    subs = [s for m in modules for s in m.modules() if _offloaded(s)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(disk_load_context())
        for s in subs:
            stack.enter_context(align_module_device(s, device))
        yield
        if writeback:
            for s in subs:
                for name in list(s._parameters):
                    value = s._parameters[name]  # the onloaded tensor, changed or not
                    if value is not None:
                        update_offload_parameter(s, name, value.data)


def check_offloadable(quantizer: Any, needs_codes: bool) -> None:
    """Raise :class:`~quantlab.errors.ConfigError` unless ``quantizer`` can run on an offloaded model."""
    from quantlab.errors import ConfigError
    from quantlab.quantizers.base import QUANTIZERS

    if not quantizer.offloadable:
        ok = [n for n, cls in QUANTIZERS.items() if cls.offloadable]
        raise ConfigError("model.offload", f"{quantizer.name} changes weights outside the calibration engine's "
                                           f"one-block-at-a-time passes; offload={MODES[0]} supports {ok}")
    if getattr(quantizer.config, "wakv", None):
        raise ConfigError("quantizer.wakv", "activation/KV-cache fake quantization swaps Linears for in-memory "
                                            "copies: not with model.offload")
    if needs_codes:
        raise ConfigError("deploy", "packing and export hold every layer's integer codes in memory: not with "
                                    "model.offload")


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where the calibration engine computes ``module``: the accelerator holding it (a model sharded
    over several GPUs with ``device_map=auto`` is computed where each block lives), else ``default``."""
    p = next(iter(module.parameters()), None) if not is_offloaded(module) else None
    if p is not None and p.device.type not in ("cpu", "meta"):
        return p.device
    return default


def disk_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, read from their shapes (nothing is onloaded)."""
    from compressed_tensors.offload import disable_onloading

    with disable_onloading():
        seen: set[int] = set()
        total = 0
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.nelement() * t.element_size()
    return total


def offload_folder(configured: str | None) -> tuple[Path, bool]:
    """The folder offloaded tensors live in: ``configured``, or (``True`` second) a new one under the
    quantlab cache, for :func:`remove_with` (on disk: ``/tmp`` may be a RAM-backed tmpfs, which would
    defeat offloading)."""
    if configured:
        folder = Path(configured).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        return folder, False
    from quantlab.utils.paths import cache_dir

    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=root)), True


def remove_with(owner: Any, folder: Path) -> None:
    """Delete ``folder`` when ``owner`` is garbage collected or the process exits."""
    weakref.finalize(owner, shutil.rmtree, str(folder), True)


@contextlib.contextmanager
def offloaded_loading() -> Iterator[None]:
    """``from_pretrained`` calls inside build compressed-tensors offloaded models (``device_map="disk"``)."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    with load_offloaded_model(AutoModelForCausalLM):
        yield
