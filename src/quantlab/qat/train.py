"""Logit distillation of a fake-quantized student from its full-precision teacher (LLM-QAT section 2.1).

Loss: cross-entropy between the teacher's and the student's next-token distributions at every
position, Eq. (4) of the paper, ``L = -1/n sum_c sum_i p_T(c) log p_S(c)``, averaged over the B x T
token positions of a micro-batch; no ground-truth term. ``loss="kl"`` reports ``KL(p_T || p_S)``
instead, lower by the teacher's entropy (a constant of the student): the two have the same gradient.
The public code (``kd_trainer.py``) computes ``F.kl_div(log p_S, p_T, reduction="batchmean")`` on
``(B, T, vocab)`` logits, i.e. the per-token KL *summed* over the T positions and averaged over the B
sequences: T times ``loss="kl"`` here (T = the block length, 2048 in ``run_train.sh``), so its
gradient is T times this one. Under AdamW a constant factor on the loss changes the update only
through ``eps``, but the code's Hugging Face Trainer also clips the gradient norm at 1.0
(``TrainingArguments.max_grad_norm``'s default), and whether a step is clipped depends on that scale;
quantlab does not clip.

Optimiser as in ``run_train.sh``: AdamW, lr 2e-5, weight decay 0, cosine schedule without warmup;
every parameter of the student is trained. Batches are drawn from a permutation seeded by (seed,
epoch), so step ``k`` sees the same rows whether or not the run was interrupted: resuming from a
checkpoint (student weights, optimiser, scheduler, loss history, written atomically) continues the
exact trajectory.

``parallel=ddp|fsdp`` trains on the processes torchrun started (:mod:`quantlab.qat.parallel`):
``batch_size`` stays the global micro-batch, each rank computes the loss of its contiguous slice of
it, gradients are averaged over the ranks and the recorded loss is the mean over the ranks, i.e. the
single-process loss of the whole micro-batch. Under ``fsdp`` rank 0 keeps the unsharded student for
what follows (moved to the CPU while a sharded copy trains) and gets the trained weights back at the
end. Checkpoints are written by rank 0 in the single-process format, so a run of either layout
resumes the other's.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantlab.errors import ConfigError
from quantlab.qat import parallel as par
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

LOSSES = ("soft_ce", "kl")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT = "qat_checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """QAT training settings.

    Attributes:
        steps: optimiser steps.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimiser step.
        seq_len: tokens per training sequence (generated texts are concatenated and cut).
        lr, weight_decay, warmup_steps: AdamW with a cosine schedule to 0.
        loss: ``soft_ce`` (the paper's Eq. 4) or ``kl`` (the code's divergence, per token: the code's
            loss is this one summed over the sequence, see the module docstring); same gradient.
        seed: batch order.
        checkpoint_every: steps between checkpoints (0 = only at the end).
        precision: ``fp32`` or ``bf16`` (forward passes under bf16 autocast, as the reference's
            ``--bf16``; parameters and optimiser states stay in the dtype the model was loaded in, so
            load it in float32 for fp32 master weights).
        parallel: ``none`` (one process), ``ddp`` (replicas, DistributedDataParallel) or ``fsdp`` (FSDP2
            shards) on the processes torchrun started; ``batch_size`` is then the global micro-batch,
            split evenly over the ranks (:mod:`quantlab.qat.parallel`). Not part of the run's variant
            or fingerprint: it changes where the sums are computed, not what they are.
    """

    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    loss: str = "soft_ce"
    seed: int = 0
    checkpoint_every: int = 0
    precision: str = "fp32"
    parallel: str = "none"

    def __post_init__(self) -> None:
        k = "quantizer.train"
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ConfigError(f"{k}.{name}", f"must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "checkpoint_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ConfigError(f"{k}.{name}", f"must be an integer >= 0, got {v!r}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError(f"{k}.lr", f"must be > 0, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{k}.precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"{k}.loss", f"must be one of {LOSSES}, got {self.loss!r}")
        par.check_launch(self.parallel, self.batch_size)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "soft_ce") -> torch.Tensor:
    """Mean over positions of ``-sum_c p_T(c) log p_S(c)`` (Eq. 4) or of ``KL(p_T || p_S)``, in fp32."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    p_t = F.softmax(teacher_logits.float(), dim=-1)
    ce = -(p_t * log_s).sum(-1)
    if kind == "kl":
        ce = ce + (p_t * torch.log(p_t.clamp_min(1e-30))).sum(-1)
    return ce.mean()


def blocks_from_sequences(sequences: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate the sequences and cut them into ``(n_blocks, seq_len)`` (the code's grouping)."""
    flat = [t for s in sequences for t in s]
    n = len(flat) // seq_len
    if n == 0:
        raise ConfigError("quantizer.train.seq_len", f"{len(flat)} generated tokens make no block of {seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor at ``step``: linear warmup, then cosine from 1 to 0 over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def _batch_rows(step: int, micro: int, n_blocks: int, cfg: TrainConfig) -> torch.Tensor:
    """Rows of micro-batch ``micro`` of step ``step``: a seeded permutation per epoch."""
    first = (step * cfg.grad_accum + micro) * cfg.batch_size
    idx = []
    for pos in range(first, first + cfg.batch_size):
        epoch, within = divmod(pos, n_blocks)
        perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        idx.append(int(perm[within]))
    return torch.tensor(idx)


def train_qat(student: nn.Module, teacher: nn.Module, data: torch.Tensor, cfg: TrainConfig,
              checkpoint_dir: Path | None = None, stop_after: int | None = None) -> list[dict[str, float]]:
    """Distil ``teacher`` into ``student`` on ``data`` (``(n_blocks, seq_len)`` token ids).

    Resumes from ``checkpoint_dir/qat_checkpoint.pt`` when present. ``stop_after`` ends the run after
    that many steps (for a budgeted session; the checkpoint lets a later call continue). Under
    ``cfg.parallel`` every rank calls this with the same arguments; rank 0's ``checkpoint_dir`` counts.

    Returns:
        The loss history ``[{"step", "loss", "lr"}]`` of every step so far (resumed ones included).
    """
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    student.train()
    mode = cfg.parallel
    if mode != "none":
        par.init(device)
    names = [n for n, p in student.named_parameters() if p.requires_grad]  # the optimizer's order
    net, t_net = student, teacher
    if mode == "fsdp":  # rank 0 keeps the plain student (on the CPU meanwhile); the others shard theirs
        net = copy.deepcopy(student.to("cpu")) if par.is_lead() else student
        t_net = par.wrap(teacher, mode, device, trainable=False)
    if mode != "none":
        net = par.wrap(net, mode, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg))
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if mode == "none" and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["step"]), list(state["history"])
        log.info("QAT: resumed from %s at step %d", ckpt, start)
    elif mode != "none":
        start, history, ckpt = _resume_distributed(net, opt, sched, names, ckpt)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="QAT", unit="step", leave=False,
               disable=not par.is_lead())
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    try:
        for step in range(start, end):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(cfg.grad_accum):
                rows = _batch_rows(step, micro, len(data), cfg)
                ids = data[par.shard_rows(rows) if mode != "none" else rows].to(device)
                with autocast:
                    with torch.no_grad():
                        t_logits = t_net(input_ids=ids).logits
                    s_logits = net(input_ids=ids).logits
                loss = distill_loss(s_logits, t_logits, cfg.loss) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            if mode != "none":
                total = par.mean_over_ranks(total, device)  # the loss of the whole global micro-batch
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            history.append({"step": step + 1, "loss": total, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if ckpt is not None and (done == end or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                if mode == "none":
                    _save(ckpt, student.state_dict(), opt.state_dict(), sched, done, history)
                else:
                    msd, osd = par.full_state(net, opt, names)
                    if par.is_lead():
                        _save(ckpt, msd, osd, sched, done, history)
                    par.barrier()
    finally:
        bar.close()
    if mode == "fsdp":  # rank 0: the trained weights back into the plain student
        msd = par.full_state(net, None, names)[0]
        if par.is_lead():
            student.load_state_dict(msd)
            student.to(device)
    student.eval()
    return history


def _resume_distributed(net: nn.Module, opt: Any, sched: Any, names: list[str],
                        ckpt: Path | None) -> tuple[int, list[dict[str, float]], Path | None]:
    """Rank 0 reads the checkpoint (if any) and broadcasts it; every rank gets ``(step, history, path)``."""
    state = None
    if par.is_lead() and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    kept = {k: state[k] for k in ("step", "history", "scheduler")} if state else {}
    meta = par.broadcast_object({"path": ckpt, "resume": state is not None, **kept})
    if not meta["resume"]:
        return 0, [], meta["path"]
    par.load_full_state(net, opt, names, state and state["student"], state and state["optimizer"])
    sched.load_state_dict(meta["scheduler"])
    if par.is_lead():
        log.info("QAT: resumed from %s at step %d (%d processes)", ckpt, meta["step"], par.world_size())
    return int(meta["step"]), list(meta["history"]), meta["path"]


def _save(path: Path, student_sd: dict[str, Any], opt_sd: dict[str, Any], sched: Any, step: int,
          history: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"student": student_sd, "optimizer": opt_sd, "scheduler": sched.state_dict(),
                "step": step, "history": history}, tmp)
    os.replace(tmp, path)
