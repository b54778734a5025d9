"""Model memory footprint (the PTQ sampling study's Table 6), counted tensor by tensor.

transformers' ``model.get_memory_footprint()`` sums parameters and buffers only. A bitsandbytes
4-bit layer keeps its block constants outside both (``weight.quant_state``: the fp32 absmax per
block of 64, or with double quantization the uint8 absmax codes, their fp32 absmax per 256, the
offset and the two code books), and an LLM.int8 layer its fp32 row scales (``weight.SCB``); without
them nf4 and nf4-dq would weigh the same. :func:`model_footprint` counts every distinct tensor storage
once: parameters, buffers and those quantization states.

GB here is 10^9 bytes, as in the paper: its fp16 Llama-2-7B row prints 13.53 GB, close to 6.74e9
params x 2 bytes = 13.48e9 bytes = 13.48 GB (12.55 GiB in binary units); the paper does not say what
its extra 0.05 GB is.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from quantlab.utils.torch_utils import get_linear

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    """Bytes held by a model.

    Attributes:
        params: parameter storage (packed 4-bit/int8 weights count at their stored size).
        buffers: registered buffers (rotary inverse frequencies, ...).
        quant_state: bitsandbytes quantization constants held outside parameters and buffers.
        hf: what ``get_memory_footprint()`` reports (parameters + buffers), for comparison.
    """

    params: int
    buffers: int
    quant_state: int
    hf: int

    @property
    def total(self) -> int:
        return self.params + self.buffers + self.quant_state

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "unit": "bytes", "gb": "1e9 bytes"}


def _quant_state_tensors(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Tensors a bitsandbytes parameter keeps beside its data (none for an ordinary parameter)."""
    qs = getattr(param, "quant_state", None)
    while qs is not None:  # 4-bit: absmax, code, offset; nested (double quantization) in state2
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                yield t
        qs = getattr(qs, "state2", None)
    for name in ("SCB", "CB"):  # LLM.int8: fp32 row scales (CB is the int8 data itself: deduplicated)
        t = getattr(param, name, None)
        if isinstance(t, torch.Tensor):
            yield t


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int, int]]) -> int:
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        nbytes = t.nelement() * t.element_size()
        key = (str(t.device), t.data_ptr(), nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def model_footprint(model: nn.Module) -> Footprint:
    """Every distinct storage of ``model``'s parameters, buffers and bitsandbytes states, once each
    (tied embeddings count once)."""
    seen: set[tuple[str, int, int]] = set()
    params = list(model.parameters())
    p = _unique_bytes(params, seen)
    b = _unique_bytes(model.buffers(), seen)
    q = _unique_bytes((t for prm in params for t in _quant_state_tensors(prm)), seen)
    hf = sum(x.nelement() * x.element_size() for x in params) + sum(
        x.nelement() * x.element_size() for x in model.buffers()
    )
    return Footprint(params=p, buffers=b, quant_state=q, hf=hf)


def packed_estimate(model: nn.Module, layers: dict[str, float]) -> int:
    """Bytes the model would hold if the Linears in ``layers`` (name -> bits per weight, scales
    included) were stored packed and everything else stayed as it is: for fake-quantized runs, whose
    weights are held in floating point."""
    fp = model_footprint(model).total
    saved = 0.0
    for name, bpw in layers.items():
        w = get_linear(model, name).weight
        saved += w.nelement() * (w.element_size() - bpw / 8)
    return int(round(fp - saved))
