"""A real low-bit Linear: packed integer codes, computed through a chosen backend.

:class:`PackedLinear` holds one Linear's weight in compressed-tensors ``pack-quantized`` layout
(:mod:`quantlab.formats.layouts.compressed_tensors`; buffer names are that format's, so the module's
``state_dict`` *is* the export) and computes ``y = x · dequant(W)ᵀ + b`` with one of:

* ``reference`` — unpack, dequantize (``(q - z) * s`` in the scales' dtype, then the activations'),
  ``F.linear``: the oracle. With fp32 scales (an fp32 model) it equals the fake-quant model bit for bit.
* ``cpu`` — torch's ``_weight_int4pack_mm_for_cpu`` (:mod:`quantlab.formats.layouts.aten_int4`) on bf16
  activations (fp32 activations make the op 30-75x slower, so they are cast; the output is cast back).
  The CPU-specific repacked weight is built when the backend is selected and never saved. 4 bits,
  groups of 32/64/128/256, out_features % 16 == 0.
* ``triton`` — the project's W4A16/W8A16 kernel (``kernels/w4a16_triton.py``) on CUDA, or anywhere
  under ``TRITON_INTERPRET=1`` (correctness only).

GPTQ act_order weights (``g_idx``) run on kernels that only know contiguous groups by permuting the
weight's columns once and the activations' columns at every call (as exllama and Marlin do).
"""
from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.layouts import aten_int4
from quantlab.formats.layouts import compressed_tensors as ct
from quantlab.nn.swap import replace_module
from quantlab.utils.torch_utils import get_linear

log = logging.getLogger(__name__)

BACKENDS = ("reference", "cpu", "triton")
KEY = "deploy.backend"


def backend_problem(qw: QuantizedWeight, backend: str) -> str | None:
    """Why ``backend`` cannot run ``qw``, or None."""
    if backend not in BACKENDS:
        return f"must be one of {BACKENDS}, got {backend!r}"
    if qw.bits not in ct.BITS:
        return f"packed layers hold {ct.BITS}-bit codes, not {qw.bits}-bit"
    if backend == "cpu":
        why = aten_int4.unsupported(qw) or ("the model is not on the CPU" if qw.codes.device.type != "cpu" else None)
        return f"the cpu backend (torch's int4 kernel) cannot run this layer: {why}" if why else None
    if backend == "triton":
        from quantlab.deploy.kernels import triton_available

        if not triton_available():
            return "the triton backend needs triton and a CUDA device (or TRITON_INTERPRET=1 for a CPU check)"
    return None


class PackedLinear(nn.Module):
    """Weight-only quantized Linear (see the module docstring).

    Buffers (compressed-tensors names): ``weight_packed`` int32 [N, K*b/32], ``weight_scale`` [N, K/G],
    ``weight_shape`` int64 [2], ``weight_zero_point`` (asymmetric) int32 [ceil(N*b/32), K/G],
    ``weight_g_idx`` int32 [K] (permuted groups only); ``bias`` as in ``nn.Linear``.
    """

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None,
                 backend: str = "reference") -> None:
        super().__init__()
        if qw.bits not in ct.BITS:
            raise ConfigError(KEY, f"packed layers hold {ct.BITS}-bit codes, not {qw.bits}-bit")
        scale_dtype = scale_dtype or qw.scales.dtype
        tensors = {k: t.to(qw.codes.device) for k, t in ct.pack(qw, scale_dtype).items()}
        self._init_state(tensors, qw.bits, qw.group_size, qw.symmetric, bias)
        # the backend is built from what the module holds (scales rounded to scale_dtype), as after a reload
        self.set_backend(backend, qw if scale_dtype == qw.scales.dtype else None)

    @classmethod
    def from_compressed(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool,
                        bias: torch.Tensor | None = None, backend: str = "reference") -> PackedLinear:
        """A module holding a compressed-tensors checkpoint's tensors of one Linear as they are (no repacking)."""
        if bits not in ct.BITS:
            raise ConfigError(KEY, f"packed layers hold {ct.BITS}-bit codes, not {bits}-bit")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        k = int(tensors["weight_shape"][1])
        mod._init_state(tensors, bits, k if group_size in (None, -1) else group_size, symmetric, bias)
        mod.set_backend(backend)
        return mod

    def _init_state(self, tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool,
                    bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = (int(v) for v in tensors["weight_shape"].tolist())
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.backend = "reference"
        self._ws: dict[str, torch.Tensor | None] = {}

    # ------------------------------------------------------------------ the stored weight
    def quantized(self) -> QuantizedWeight:
        """The codes, scales and zeros this module holds (unpacked)."""
        t = {k: v for k, v in self.named_buffers(recurse=False) if k.startswith("weight_")}
        return ct.unpack(t, self.bits, self.group_size, self.symmetric)

    def quantized_weight(self) -> torch.Tensor:
        """Dense dequantized weight (N, K) in the scales' dtype (used by layer diagnostics)."""
        return self.quantized().dequantize()

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    # ------------------------------------------------------------------ backends
    def set_backend(self, backend: str, qw: QuantizedWeight | None = None) -> None:
        """Select the backend and build its workspace (CPU repack, unpacked zeros), dropping the old one
        (``qw``: this module's weight when the caller has it unpacked already)."""
        if backend == "reference":  # needs no workspace and no unpacking here
            self._drop_ws()
            self.backend = backend
            return
        qw = qw if qw is not None else self.quantized()
        why = backend_problem(qw, backend)
        if why:
            raise ConfigError(KEY, why)
        self._drop_ws()
        perm = qw.act_order_perm() if backend != "reference" else None
        if perm is not None:
            qw = qw.permuted(perm)
            self._add_ws("ws_perm", perm.to(self.weight_packed.device))
        if backend == "cpu":
            packed, sz = aten_int4.pack(qw)
            self._add_ws("ws_int4", packed)
            self._add_ws("ws_sz", sz)
        elif backend == "triton":
            self._add_ws("ws_qweight", ct.pack(qw, self.weight_dtype)["weight_packed"] if perm is not None
                         else self.weight_packed)
            self._add_ws("ws_zeros", None if qw.symmetric else qw.zeros.to(self.weight_dtype))
        self.backend = backend

    def _drop_ws(self) -> None:
        for name in list(self._ws):
            delattr(self, name)
        self._ws = {}

    def _add_ws(self, name: str, t: torch.Tensor | None) -> None:
        self.register_buffer(name, t, persistent=False)  # moves with .to(), counted as held memory, never saved
        self._ws[name] = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.quantized_weight().to(x.dtype), bias)
        b = self._buffers  # direct: nn.Module.__getattr__ costs microseconds per call at decode sizes
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        perm = b.get("ws_perm")
        if perm is not None:
            x2 = x2.index_select(1, perm)
        if self.backend == "cpu":
            y = aten_int4.matmul(x2.to(torch.bfloat16).contiguous(), cast(torch.Tensor, b["ws_int4"]), self.group_size,
                                 cast(torch.Tensor, b["ws_sz"]))
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            from quantlab.deploy.kernels import triton_kernels

            y = triton_kernels().w4a16_matmul(x2.contiguous(), b["ws_qweight"], b["weight_scale"], b["ws_zeros"],
                                              self.group_size, bits=self.bits, bias=self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == self.in_features else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, w{self.bits} {g} "
                f"{'sym' if self.symmetric else 'asym'}, backend={self.backend}")


def pack_linears(model: nn.Module, codes: dict[str, QuantizedWeight], backend: str = "reference",
                 scale_dtype: torch.dtype | None = None) -> list[str]:
    """Replace every Linear named in ``codes`` by a :class:`PackedLinear` on the Linear's device, its scales in
    ``scale_dtype`` (default: the Linear's weight dtype). All layers are checked before any is replaced."""
    for name, qw in codes.items():
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear) or tuple(mod.weight.shape) != qw.shape:
            raise ConfigError("deploy.pack", f"{name} is not a Linear of shape {qw.shape}")
        why = backend_problem(qw, backend)
        if why:
            raise ConfigError(KEY, f"{why} ({name})")
    for name, qw in codes.items():
        mod = get_linear(model, name)
        dev = mod.weight.device
        qw = QuantizedWeight(qw.codes.to(dev), qw.scales.to(dev), qw.zeros.to(dev), qw.bits, qw.group_size,
                             qw.symmetric, None if qw.g_idx is None else qw.g_idx.to(dev))
        bias = cast("torch.Tensor | None", mod.bias)
        replace_module(model, name, PackedLinear(qw, bias, scale_dtype or mod.weight.dtype, backend))
    log.info("packed %d Linears (backend %s)", len(codes), backend)
    return list(codes)


def packed_modules(model: nn.Module) -> list[tuple[str, PackedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every :class:`PackedLinear` of ``model`` to ``backend``."""
    for _, mod in packed_modules(model):
        mod.set_backend(backend)
