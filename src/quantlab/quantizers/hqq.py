"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023): data-free, float zero points optimized per group.

Each weight group (``group_size`` consecutive input channels of one row, like RTN) starts from its
min/max affine parameters and keeps its scale; only the zero point ``z`` moves, to minimize a sparsity-
promoting l_p error (p < 1) of the dequantized weights instead of RTN's implicit l_inf / l_2:

    argmin_z  || W - Q_z^-1(Q_z(W)) ||_p^p                                    (the paper's problem)

Half-quadratic splitting adds an auxiliary error ``W_e`` and a penalty ``beta/2 ||W_e - (W - Q_z^-1(Q_z(W)))||^2``
and alternates two closed-form sub-problems, ``beta`` growing by ``kappa`` each iteration:

    sp1:  W_e <- shrink_p(W - Q_z^-1(Q_z(W)), beta),  shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)
    sp2:  z   <- mean over the group of ( Q_z(W) - (W - W_e) / s )

The arithmetic follows the reference ``hqq.core.optimize.optimize_weights_proximal_legacy`` (HQQ's
default optimizer) and ``hqq.core.quantize.Quantizer.quantize`` line for line, including its conventions:

* the scale is held as its inverse ``inv = (2^b - 1) / (max - min)``, clamped to 2e4 (a group with
  ``max == min`` gets ``inv = 1``); ``Q_z(W) = clamp(round(W inv + z), 0, 2^b - 1)``; the stored scale
  is ``1 / inv`` and the weight is dequantized as ``(q - z) * (1 / inv)``;
* the initial zero is ``-min inv`` and is not rounded (``round_zero=False``, the reference default);
* early stop: iteration i measures ``mean |W - Q_z^-1(Q_z(W))|`` of the zero it started from, after
  the zero update; when it is not lower than the best so far the loop stops, keeping the zero just
  computed (the reference's behaviour, not the best zero seen). ``early_stop=false`` runs every iteration.

Deviation, as a named option: the reference solves in fp16 on CUDA and fp32 on CPU; quantlab solves in
``solver_dtype`` (default float32 on every device, so CPU and GPU runs agree).

The zero points are fp16-sized floats, not b-bit integers: the bits per weight count a 16-bit zero per
group (:meth:`HQQQuantizer.bits_per_weight`), and the run cannot be packed into the integer-zero
formats of :mod:`quantlab.deploy` (``packable = False``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from quantlab.calib.sequential import on_device
from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

MAX_INV_SCALE = 2e4  # reference clamp of 1/scale ("to avoid half-precision problems")
SOLVER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class HQQConfig(QuantizerConfig):
    """HQQ settings; defaults are the reference's (``BaseQuantizeConfig``, ``optimize_weights_proximal``).

    Attributes:
        format: asymmetric integer format (default 4 bits, groups of 64, HQQ's default group size).
        lp_norm: p of the l_p error (0 < p <= 1; p = 1 is plain soft-thresholding).
        beta: initial half-quadratic penalty weight.
        kappa: factor by which beta grows every iteration (> 1).
        iters: maximum iterations of the two sub-problems.
        early_stop: stop when the mean absolute error stops falling (the reference; false = every iteration).
        solver_dtype: dtype of the solve (``float32``; the reference uses float16 on CUDA).
        save_codes: also return codes, scales and float zeros as artifacts (with ``save_artifacts``).
    """

    format: QuantFormat = field(default_factory=lambda: QuantFormat(group_size=64))
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    solver_dtype: str = "float32"
    save_codes: bool = False

    execution_fields: ClassVar[tuple[str, ...]] = ("save_codes",)

    def __post_init__(self) -> None:
        super().__post_init__()
        fmt = self.format
        if fmt.kind != "int" or fmt.symmetric or fmt.zero_in_range:
            raise ConfigError("quantizer.format", "HQQ optimizes the zero point of an asymmetric min/max int grid: "
                              f"kind int, symmetric false, zero_in_range null/false; got {fmt.short_name()}")
        for key, ok in (("lp_norm", 0 < _num(self.lp_norm) <= 1), ("beta", _num(self.beta) > 0),
                        ("kappa", _num(self.kappa) > 1)):
            if not ok:
                raise ConfigError(f"quantizer.{key}", f"out of range: {getattr(self, key)!r} (lp_norm in (0, 1], "
                                  "beta > 0, kappa > 1)")
        if not is_int(self.iters) or self.iters < 1:
            raise ConfigError("quantizer.iters", f"must be an integer >= 1, got {self.iters!r}")
        if self.solver_dtype not in SOLVER_DTYPES:
            raise ConfigError("quantizer.solver_dtype", f"one of {sorted(SOLVER_DTYPES)}, got {self.solver_dtype!r}")


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """sp1's generalized soft-thresholding: ``sign(x) relu(|x| - |x|^(p-1) / beta)`` (p = 1: ``|x| - 1/beta``)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().pow(p - 1))


def optimize_zero(w: torch.Tensor, inv: torch.Tensor, zero: torch.Tensor, maxq: int, cfg: HQQConfig
                  ) -> tuple[torch.Tensor, int]:
    """The half-quadratic loop on groups ``w`` (G, g) with inverse scales/zeros (G, 1): ``(zero, iterations)``."""
    beta, best = float(cfg.beta), 1e4  # the reference's initial "best error"
    it = 0
    for it in range(1, cfg.iters + 1):
        q = torch.round(w * inv + zero).clamp(0, maxq)
        r = (q - zero) / inv
        e = shrink_lp(w - r, beta, float(cfg.lp_norm))                     # sp1
        zero = torch.mean(q - (w - e) * inv, dim=1, keepdim=True)          # sp2
        beta *= float(cfg.kappa)
        err = float(torch.abs(w - r).mean())
        if not cfg.early_stop:
            continue
        if err < best:
            best = err
        else:
            break
    return zero, it


def hqq_quantize(w: torch.Tensor, cfg: HQQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """HQQ of one (out, in) weight: ``(codes (out, in) uint8, scale (out, G), zero (out, G), iterations)``,
    dequantized as ``(codes - zero) * scale`` per group."""
    fmt = cfg.format
    out_f, in_f = w.shape
    g = fmt.effective_group_size(in_f)
    dt = SOLVER_DTYPES[cfg.solver_dtype]
    groups = w.to(dt).reshape(-1, g)
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    maxq = 2**fmt.bits - 1
    span = hi - lo
    span = torch.where(span == 0, torch.full_like(span, maxq), span)
    inv = (maxq / span).clamp(max=MAX_INV_SCALE)
    zero, iters = optimize_zero(groups, inv, -lo * inv, maxq, cfg)
    q = torch.round(groups * inv + zero).clamp(0, maxq)
    return (q.to(torch.uint8).reshape(out_f, in_f), (1.0 / inv).reshape(out_f, -1), zero.reshape(out_f, -1), iters)


def hqq_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(codes - zero) * scale`` with each group's parameters (the reference's dequantization)."""
    out_f, in_f = codes.shape
    q = codes.to(scale.dtype).reshape(-1, group_size)
    return ((q - zero.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(out_f, in_f)


@register_quantizer("hqq", HQQConfig)
class HQQQuantizer(Quantizer[HQQConfig]):
    """Replaces each selected Linear's weight by its HQQ fake-quantized value (no calibration data)."""

    offloadable = True

    def bits_per_weight(self, in_features: int) -> float:
        """b-bit codes plus one 16-bit scale and one 16-bit float zero per group."""
        fmt = self.config.format
        return fmt.bits + (fmt.scale_bits + 16) / fmt.effective_group_size(in_features)

    @torch.no_grad()
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        fmt = self.config.format
        done: list[str] = []
        artifacts: dict[str, torch.Tensor] = {}
        iters: list[int] = []
        for name, mod in self.target_linears(model):
            with on_device([mod], ctx.device):
                w = mod.weight.data
                q, scale, zero, n = hqq_quantize(w, self.config)
                mod.weight.data.copy_(hqq_dequantize(q, scale, zero, fmt.effective_group_size(w.shape[1])).to(w.dtype))
                if self.config.save_codes:
                    artifacts.update({f"{name}.qweight": q.cpu(), f"{name}.scales": scale.float().cpu(),
                                      f"{name}.zeros": zero.float().cpu()})
            iters.append(n)
            done.append(name)
        mean_it = sum(iters) / max(len(iters), 1)
        log.info("HQQ %s: quantized %d Linear layers (%.1f iterations on average)", fmt.short_name(), len(done), mean_it)
        return QuantResult(model=model, quantized_layers=done, artifacts=artifacts,
                           summary={"n_layers": len(done), "mean_iterations": mean_it, "max_iterations": max(iters, default=0)})
