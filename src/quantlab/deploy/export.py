"""Writing a quantized model as a checkpoint that vLLM and transformers load.

``write_checkpoint`` takes the model (its non-quantized tensors: embeddings, norms, lm_head, biases),
the quantized Linears' :class:`~quantlab.formats.codes.QuantizedWeight` and a format, and writes into a
fresh directory (built under a temporary name and renamed, so a failed export leaves nothing that looks
finished): ``model.safetensors``, ``config.json`` with the format's ``quantization_config``,
``generation_config.json``, the tokenizer, and ``quantlab_export.json`` (which run, method, variant and
format it came from).

Formats and what each can hold (a combination a target cannot represent stops with a
:class:`ConfigError` naming the setting):

=====================  ============================  =====================================================
format                 layout                        limits
=====================  ============================  =====================================================
``compressed-tensors`` ``pack-quantized``, scales in  4/8 bits, sym or asym; no act_order g_idx (removed in
                       the model's dtype             compressed-tensors 0.20)
``gptq``               GPTQ v1, fp16 scales          4/8 bits, symmetric only (vLLM refuses asymmetric GPTQ);
                                                     act_order g_idx kept (``desc_act``)
``awq``                AWQ GEMM, fp16 scales         4 bits, contiguous groups; a symmetric weight is stored
                                                     with its zero 2^(b-1)
=====================  ============================  =====================================================

Every format: group size in {-1 (per channel), 32, 64, 128}, what vLLM's Marlin kernels take.
With an fp32 model, the compressed-tensors export holds exactly the fake-quant weights (fp32 scales); GPTQ
and AWQ store fp16 scales, so their weights differ from the fake-quant ones by the scales' fp16 rounding.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.codes import QuantizedWeight
from quantlab.formats.layouts import awq as awq_layout
from quantlab.formats.layouts import compressed_tensors as ct_layout
from quantlab.formats.layouts import gptq as gptq_layout

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq", "awq")
GROUP_SIZES = (-1, 32, 64, 128)  # vLLM Marlin (gptq_marlin / awq_marlin / compressed-tensors W4A16)
META_FILE = "quantlab_export.json"
WEIGHTS_FILE = "model.safetensors"


def common_group_size(codes: dict[str, QuantizedWeight], key: str = "quantizer.format.group_size") -> int:
    """The checkpoint's group size: the one size all layers share, else -1 when every layer is per channel
    (one group spanning its inputs)."""
    sizes = {qw.group_size for qw in codes.values()}
    if len(sizes) == 1:
        return sizes.pop()
    if all(qw.group_size == qw.shape[1] for qw in codes.values()):
        return -1
    raise ConfigError(key, f"layers use different group sizes {sorted(sizes)}; a checkpoint has one")


def check_scheme(fmt: str, bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    """The rules of the table above: raise :class:`ConfigError`, naming the setting, when ``fmt`` cannot hold a
    ``bits``-bit scheme with this group size (-1 per channel), symmetry and act_order (permuted groups).
    Checked from the method's config before any work (:func:`quantlab.deploy.config.check_exports_early`) and
    from the codes themselves before writing (:func:`check_export`)."""
    if group_size not in GROUP_SIZES:
        raise ConfigError("quantizer.format.group_size", f"{fmt} export: group size {group_size} is not one vLLM's "
                                                         f"Marlin kernels take ({GROUP_SIZES})")
    if fmt == "compressed-tensors" and act_order:
        raise ConfigError("quantizer.act_order", "compressed-tensors >= 0.20 stores no g_idx: export gptq, or "
                                                 "quantize with act_order=false or static_groups=true")
    if fmt == "gptq" and not symmetric:
        raise ConfigError("quantizer.format.symmetric", "gptq export: vLLM serves symmetric GPTQ only (asymmetric "
                                                        "raises 'Unsupported quantization config'); export "
                                                        "compressed-tensors or awq for an asymmetric model")
    if fmt == "awq" and (bits != 4 or act_order):
        raise ConfigError("quantizer.format.bits" if bits != 4 else "quantizer.act_order",
                          "awq export holds 4-bit codes in contiguous groups")


def check_export(fmt: str, codes: dict[str, QuantizedWeight], key: str = "deploy.export") -> None:
    """Raise :class:`ConfigError` when ``fmt`` cannot represent ``codes``."""
    if fmt not in FORMATS:
        raise ConfigError(key, f"unknown format {fmt!r}; choose from {FORMATS}")
    if not codes:
        raise ConfigError(key, "no quantized Linear to export")
    bits = {qw.bits for qw in codes.values()}
    sym = {qw.symmetric for qw in codes.values()}
    if len(bits) != 1 or len(sym) != 1:
        raise ConfigError(key, "layers differ in bits or symmetry; a checkpoint has one scheme")
    check_scheme(fmt, bits.pop(), common_group_size(codes), sym.pop(),
                 any(qw.g_idx is not None for qw in codes.values()))


def _layer_tensors(fmt: str, qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    qw = QuantizedWeight(qw.codes.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.bits, qw.group_size, qw.symmetric,
                         None if qw.g_idx is None else qw.g_idx.cpu())
    if fmt == "compressed-tensors":
        return ct_layout.pack(qw, scale_dtype)
    if fmt == "gptq":
        return gptq_layout.pack(qw)
    return awq_layout.pack(qw)


def quantization_config(fmt: str, codes: dict[str, QuantizedWeight], ignore: list[str]) -> dict[str, Any]:
    qw = next(iter(codes.values()))
    g = common_group_size(codes)
    if fmt == "compressed-tensors":
        return ct_layout.quantization_config(qw.bits, g, qw.symmetric, ignore)
    if fmt == "gptq":
        act_order = any(q.g_idx is not None for q in codes.values())
        return gptq_layout.quantization_config(qw.bits, g, qw.symmetric, act_order)
    return awq_layout.quantization_config(g)


def checkpoint_state(model: nn.Module, codes: dict[str, QuantizedWeight], fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: every tensor of the model's state dict, except that each quantized Linear's
    weight (or packed buffers) is replaced by the format's tensors; storage shared by several names (tied
    embeddings) is written once, under its first name."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    prefixes = tuple(f"{n}." for n in codes)
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) and not key.endswith(".bias"):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().to("cpu").contiguous()
    for name, qw in codes.items():
        out.update({f"{name}.{k}": v.contiguous() for k, v in _layer_tensors(fmt, qw, dtype).items()})
    return out


def write_checkpoint(model: nn.Module, tokenizer: Any, codes: dict[str, QuantizedWeight], out_dir: Path, fmt: str,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with ``codes`` as a ``fmt`` checkpoint into ``out_dir`` (which must not exist yet)."""
    from safetensors.torch import save_file

    check_export(fmt, codes)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError("export.out_dir", f"{out_dir} already exists; choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        ignore = sorted(n for n, m in model.named_modules() if _is_linear(m) and n not in codes)
        save_file(checkpoint_state(model, codes, fmt), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cast(Any, model.config).save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = quantization_config(fmt, codes, ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            cast(Any, model.generation_config).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"format": fmt, "layers": len(codes), "ignore": ignore, **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d quantized Linears as %s to %s", len(codes), fmt, out_dir)
    return out_dir


def _is_linear(m: nn.Module) -> bool:
    from quantlab.nn.packed import PackedLinear

    return isinstance(m, (nn.Linear, PackedLinear))
