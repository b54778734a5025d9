"""Loading an exported checkpoint (compressed-tensors, GPTQ v1, AWQ GEMM) into :class:`PackedLinear` layers.

The model is built from its ``config.json`` without allocating weights (``accelerate.init_empty_weights``),
every quantized Linear is replaced by a :class:`~quantlab.nn.packed.PackedLinear` holding the checkpoint's
codes (unpacked by :mod:`quantlab.formats.layouts` and repacked into quantlab's layout), and every other
tensor is assigned from the file. Works for quantlab's exports and for other tools' checkpoints in the
same formats (one ``model.safetensors`` or sharded ``model-*.safetensors``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.errors import DataError
from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.layouts import awq as awq_layout
from quantlab.formats.layouts import compressed_tensors as ct_layout
from quantlab.formats.layouts import gptq as gptq_layout
from quantlab.nn.packed import PackedLinear
from quantlab.nn.swap import replace_module

log = logging.getLogger(__name__)

QUANT_METHODS = ("compressed-tensors", "gptq", "awq")
_MARKER = {"compressed-tensors": "weight_packed", "gptq": "qweight", "awq": "qweight"}


def packed_quant_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``quantization_config`` when it is one quantlab loads into packed layers, else None."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") in QUANT_METHODS else None


def _scheme(qc: dict[str, Any], where: Path) -> tuple[int, int, bool]:
    """``(bits, group_size, symmetric)`` of a quantization_config."""
    method = qc["quant_method"]
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if qc.get("format") != ct_layout.FORMAT or len(groups) != 1:
            raise DataError(f"model.path: {where}: only one-group compressed-tensors '{ct_layout.FORMAT}' "
                            f"checkpoints load into packed layers (format {qc.get('format')!r})")
        w = next(iter(groups.values()))["weights"]
        return int(w["num_bits"]), int(w.get("group_size") or -1), bool(w["symmetric"])
    if method == "gptq":
        if qc.get("checkpoint_format", "gptq") != "gptq":
            raise DataError(f"model.path: {where}: GPTQ checkpoint_format {qc.get('checkpoint_format')!r}; "
                            "v1 ('gptq') only")
        return int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True))
    if str(qc.get("version", "gemm")).lower() != "gemm":
        raise DataError(f"model.path: {where}: AWQ version {qc.get('version')!r}; GEMM only")
    return int(qc["bits"]), int(qc["group_size"]), False


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DataError(f"model.path: no .safetensors file in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _unpack(method: str, t: dict[str, torch.Tensor], bits: int, g: int, sym: bool) -> QuantizedWeight:
    if method == "compressed-tensors":
        return ct_layout.unpack(t, bits, g, sym)
    if method == "gptq":
        return gptq_layout.unpack(t, bits, g, sym)
    return awq_layout.unpack(t, g)


def load_packed(folder: str | Path, dtype: torch.dtype, device: torch.device,
                trust_remote_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint in ``folder`` as a stock HF model with :class:`PackedLinear` layers (``reference``
    backend; switch with :func:`quantlab.nn.packed.set_backend`), and facts for the record."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    qc = packed_quant_config(folder)
    if qc is None:
        raise DataError(f"model.path: {folder} holds no compressed-tensors / gptq / awq checkpoint")
    method = qc["quant_method"]
    bits, g, sym = _scheme(qc, folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quantlab builds the packed layers itself
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tensors = _read_tensors(folder)
    marker = _MARKER[method]
    names = sorted(k[: -len(marker) - 1] for k in tensors if k.endswith("." + marker))
    for name in names:
        prefix = f"{name}."
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        bias = own.pop("bias", None)
        bias = None if bias is None else bias.to(dtype)
        old = model.get_submodule(name)
        if method == "compressed-tensors":  # quantlab's own layout: the file's tensors as they are
            shape = tuple(int(v) for v in own["weight_shape"].tolist())
            new = PackedLinear.from_compressed(own, bits, g, sym, bias)
        else:  # GPTQ / AWQ: unpacked and repacked; their fp16 scales held in fp32 (exact, whatever the model dtype)
            qw = _unpack(method, own, bits, g, sym)
            qw = QuantizedWeight(qw.codes, qw.scales.float(), qw.zeros.float(), qw.bits, qw.group_size,
                                 qw.symmetric, qw.g_idx)
            shape, new = qw.shape, PackedLinear(qw, bias, None, "reference")
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
            raise DataError(f"model.path: {folder}: {name} holds a {shape} weight; the model's module differs")
        replace_module(model, name, new)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if meta or unexpected:
        raise DataError(f"model.path: {folder}: tensors missing for {meta[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device).eval()
    info = {"packed_checkpoint": {"format": method, "bits": bits, "group_size": g, "symmetric": sym,
                                  "layers": len(names), "path": str(folder)}}
    meta_file = folder / "quantlab_export.json"
    if meta_file.is_file():
        info["packed_checkpoint"]["export"] = json.loads(meta_file.read_text())
    log.info("loaded %s checkpoint %s: %d packed Linears (w%d g%d %s)", method, folder, len(names), bits, g,
             "sym" if sym else "asym")
    return model, info
