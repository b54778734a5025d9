"""LLM-QAT on many processes: torchrun, DDP or FSDP2, rank-0 files (``quantizer.train.parallel``).

``torchrun --nproc_per_node W -m quantlab ... quantizer.train.parallel=ddp|fsdp`` starts W processes;
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``) says so, and
:func:`init` joins them into one process group (NCCL on CUDA, gloo on CPU). ``parallel=none`` is the
single-process path, untouched. The model is replicated (``ddp``: torch's ``DistributedDataParallel``)
or sharded per decoder layer (``fsdp``: FSDP2's ``fully_shard``); every rank takes a contiguous slice of
each global micro-batch (:func:`shard_rows`), gradients are averaged over the ranks, so W ranks x b/W
rows make the step of 1 process x b rows (exact arithmetic; in floating point the sums' order differs).

Files are written by rank 0 only; checkpoints hold the full (unsharded) state in the single-process
format (:func:`full_state` / :func:`load_full_state`), so either layout resumes the other's.
Not tested on GPUs (NCCL) here: the tests run 2 gloo CPU processes (``tests/test_qat_distributed.py``).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from quantlab.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("none", "ddp", "fsdp")
KEY = "quantizer.train.parallel"


def launched_world_size() -> int:
    """Processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def env_rank() -> int:
    """This rank per torchrun's environment (0 without torchrun; still set after :func:`shutdown`)."""
    return int(os.environ.get("RANK") or 0)


def check_launch(mode: str, batch_size: int) -> None:
    """One :class:`ConfigError` on ``quantizer.train.parallel`` when ``mode`` and the launch disagree."""
    if mode not in MODES:
        raise ConfigError(KEY, f"must be one of {MODES}, got {mode!r}")
    world = launched_world_size()
    if mode != "none" and world < 2:
        raise ConfigError(KEY, f"{mode} needs several processes: launch with torchrun --nproc_per_node N "
                               f"(WORLD_SIZE is {world}), or set it to none")
    if mode == "none" and world > 1:
        raise ConfigError(KEY, f"torchrun started {world} processes (WORLD_SIZE={world}) but parallel=none "
                               "would train the same model in each: set ddp or fsdp, or run without torchrun")
    if mode != "none" and batch_size % world:
        raise ConfigError(KEY, f"quantizer.train.batch_size={batch_size} (the global micro-batch) must be "
                               f"divisible by the {world} processes")


def bind_local_device() -> None:
    """Under torchrun with CUDA, make ``cuda`` mean this process's GPU (``LOCAL_RANK``) before anything
    is loaded, so ``model.device=cuda`` puts every rank on its own card."""
    if launched_world_size() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> None:
    """Join torchrun's process group once (NCCL for a CUDA ``device``, gloo otherwise); idempotent."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)


def is_distributed() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 when alone)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Processes in the group (1 when alone)."""
    return dist.get_world_size() if is_distributed() else 1


def is_lead() -> bool:
    """Rank 0, or the only process: the one that writes files, logs progress and records results."""
    return rank() == 0


def shard_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice ``rows[r*b/W:(r+1)*b/W]`` of a global micro-batch of ``b`` rows."""
    w, r = world_size(), rank()
    n = len(rows) // w
    return rows[r * n:(r + 1) * n]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank scalar over all ranks (float64 all-reduce); ``value`` when alone."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world_size()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); ``obj`` when alone."""
    if not is_distributed():
        return obj
    box = [obj if is_lead() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` when alone."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing when alone)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """All ranks together: wait for each other, then leave the process group (rank 0 goes on alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class FollowerDone(BaseException):
    """Raised on ranks > 0 when their part of a distributed LLM-QAT run is over: rank 0 alone
    evaluates and records; :mod:`quantlab.cli` ends such a rank with status 0. A BaseException, so
    that no ``except Exception`` on the way turns it into a failure."""


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (the classes Hugging Face names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, mode: str, device: torch.device, trainable: bool = True) -> nn.Module:
    """``ddp``: the student in a ``DistributedDataParallel`` (rank 0's weights broadcast; a frozen
    ``teacher`` stays a plain replica). ``fsdp``: FSDP2 ``fully_shard`` on every block, then the root,
    in place (parameters become DTensor shards on ``device``). Returns the module to call."""
    if mode == "ddp":
        if not trainable:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"parallel mode {mode!r} wraps nothing")


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, opt: torch.optim.Optimizer | None, names: list[str]) -> tuple[dict, dict]:
    """Collective: the full model and optimizer state on rank 0 (CPU; empty dicts elsewhere), the
    optimizer's in the single-process format (parameters by index in ``names``, the optimizer's order;
    ``{}`` for ``opt=None``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_options(cpu_offload=True))
    osd: dict[str, Any] = (get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
                           if opt is not None else {})
    if not is_lead() or opt is None:
        return msd, {}
    index = {n: i for i, n in enumerate(names)}
    plain = {"state": {index[k]: v for k, v in osd["state"].items()},
             "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in osd["param_groups"]]}
    return msd, plain


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, names: list[str],
                    msd: dict | None, osd: dict | None) -> None:
    """Collective: load rank 0's full state (single-process format; ``None`` on the other ranks) into
    every rank's (wrapped or sharded) model and optimizer, broadcast tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    fqn: dict = {}
    if is_lead():
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in cast(dict, osd)["param_groups"]]
        fqn = {"state": {names[i]: v for i, v in cast(dict, osd)["state"].items()}, "param_groups": groups}
    set_model_state_dict(model, cast(dict, msd) if is_lead() else {}, options=_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(model, opt, fqn, options=_options(broadcast_from_rank0=True))
