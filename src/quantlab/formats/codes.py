"""What a weight-only method hands to deployment: the integer codes of one Linear on an affine grid.

A :class:`QuantizedWeight` is the exact result of rounding, independent of any storage layout:
``codes`` (unsigned, ``[0, 2^b - 1]``), one ``scale`` and integer ``zero`` per group, and the group of
every input column (``g_idx``; None = contiguous groups, column ``k`` in group ``k // G``; GPTQ with
act_order stores its own). Its :meth:`~QuantizedWeight.dequantize` is, operation for operation, the
fake quantization the method wrote into the model (:func:`quantlab.formats.affine.dequantize` and
:func:`quantlab.algorithms.gptq.dequantize_gidx`), so a packed model built from it reproduces the
fake-quant model bit for bit. Layout modules (:mod:`quantlab.formats.layouts`) turn it into
compressed-tensors, GPTQ v1, AWQ GEMM or torch's CPU int4 tensors and back.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.utils.torch_utils import get_linear


@dataclass
class QuantizedWeight:
    """Integer codes of one Linear weight ``W`` (out ``N``, in ``K``).

    Attributes:
        codes: uint8 ``(N, K)``, unsigned codes in ``[0, 2^bits - 1]``.
        scales: ``(N, K // group_size)`` float (float32 from every method; float64 for a float64 model).
        zeros: ``(N, K // group_size)``, integer values in ``[0, 2^bits - 1]``, in ``scales``' dtype.
        bits: code width.
        group_size: input columns per group (``K`` for per-channel formats).
        symmetric: every zero point is ``2^(bits - 1)`` (not stored by symmetric layouts).
        g_idx: int32 ``(K,)``, the group of each column, or None for contiguous groups (``k // G``).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        bad_groups = k % self.group_size or self.scales.shape != (n, k // self.group_size)
        if bad_groups or self.zeros.shape != self.scales.shape:
            raise ValueError(f"inconsistent shapes: codes {tuple(self.codes.shape)}, scales "
                             f"{tuple(self.scales.shape)}, zeros {tuple(self.zeros.shape)}, "
                             f"group_size {self.group_size}")
        if self.g_idx is not None:
            self.g_idx = self.g_idx.to(torch.int32)
            if self.g_idx.shape != (k,):
                raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({k},)")
            if bool((self.g_idx == self.default_g_idx()).all()):
                self.g_idx = None  # contiguous groups: nothing to store

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def default_g_idx(self) -> torch.Tensor:
        """Contiguous groups: ``k // group_size``."""
        return torch.arange(self.shape[1], device=self.codes.device, dtype=torch.int32) // self.group_size

    def group_index(self) -> torch.Tensor:
        """The group of every input column (``g_idx`` or the contiguous default)."""
        return self.g_idx if self.g_idx is not None else self.default_g_idx()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W[:, k] = (q[:, k] - z[:, g(k)]) * s[:, g(k)]`` in ``scales``' dtype, then cast to ``dtype``."""
        gi = self.group_index().long()
        w = (self.codes.to(self.scales.dtype) - self.zeros[:, gi]) * self.scales[:, gi]
        return w if dtype is None else w.to(dtype)

    def act_order_perm(self) -> torch.Tensor | None:
        """For a permuted grouping (GPTQ act_order): the column order that makes groups contiguous
        (stable sort of ``g_idx``), so kernels that only know contiguous groups can run it on
        ``x[..., perm]``; None for contiguous groups. Raises ValueError if a group is not exactly
        ``group_size`` columns."""
        if self.g_idx is None:
            return None
        counts = torch.bincount(self.g_idx.long(), minlength=self.scales.shape[1])
        if not bool((counts == self.group_size).all()):
            raise ValueError("g_idx does not put exactly group_size columns in every group")
        return torch.sort(self.g_idx.long(), stable=True).indices

    def permuted(self, perm: torch.Tensor) -> QuantizedWeight:
        """The same weight with its input columns in order ``perm`` (groups then contiguous)."""
        return QuantizedWeight(self.codes[:, perm].contiguous(), self.scales, self.zeros, self.bits,
                               self.group_size, self.symmetric, None)


def from_format(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, fmt: QuantFormat,
                g_idx: torch.Tensor | None = None) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from a method's codes and its :class:`QuantFormat`."""
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(scales.dtype), fmt.bits,
                           fmt.effective_group_size(codes.shape[1]), fmt.symmetric, g_idx)


@torch.no_grad()
def rtn_linears_(block: nn.Module, rel_names: Iterable[str], fmt: QuantFormat,
                 codes: dict[str, QuantizedWeight] | None = None, prefix: str = "") -> None:
    """Round-to-nearest fake quantization of the named Linears of ``block``, in place (the last step of
    RTN-based methods: AWQ, SmoothQuant, SmoothQuant+). With ``codes``, each Linear's integer codes are
    stored there under ``prefix + name``, on the CPU (one byte per weight: a big model's codes must not
    crowd the accelerator)."""
    for rel in rel_names:
        w = get_linear(block, rel).weight
        q, scale, zero = affine.quantize_weight(w.data, fmt)
        w.data.copy_(affine.dequantize(q, scale, zero, fmt).to(w.dtype))
        if codes is not None:
            codes[prefix + rel] = from_format(q.cpu(), scale.cpu(), zero.cpu(), fmt)
