"""Quantize an HF Llama folder with GPTQModel (GPTQ), W4 asym, group G, on CPU.

Runs in the gptqmodel peer venv (see envs.py).  GPTQModel packs the result into
its torch quant-linear (BACKEND.GPTQ_TORCH); the dense fp32 weights are that
module's own ``dequantize_weight()``.  Writes OUT/weights.safetensors and
OUT/result.json.

  python scripts/peers/run_gptqmodel.py --model DIR --tokens calib.npy \
      --method gptq --group-size 64 --out OUT [--threads N]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _measure

log = logging.getLogger("quantlab.peers.gptqmodel")

# What we ask for; every other field is GPTQModel's default (recorded in settings).
QCFG = dict(bits=4, sym=False, desc_act=True, static_groups=True, act_group_aware=False,
            damp_percent=0.01, true_sequential=True, lm_head=False,
            # keep finished layers in RAM (the default True streams them to a temp dir)
            offload_to_disk=False)
QUANT_KW = dict(batch_size=1, calibration_sort=None, calibration_concat_size=None)
BLOCKSIZE = 128  # GPTQ.quantize(blocksize=128): the looper never overrides it


def _jsonable_cfg(qcfg) -> dict:
    out = {}
    for f in dataclasses.fields(qcfg):
        if f.name.startswith("_"):
            continue
        val = getattr(qcfg, f.name)
        if dataclasses.is_dataclass(val):
            val = dataclasses.asdict(val)
        out[f.name] = val
    return out


def dense_state_dict(qmodel, report: dict) -> dict[str, torch.Tensor]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    model = qmodel.model
    converted = 0
    deq: dict[str, torch.Tensor] = {}
    worst: float | str = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, BaseQuantLinear):
            if not hasattr(mod, "dequantize_weight"):
                raise RuntimeError(f"{name}: {type(mod).__name__} has no dequantize_weight()")
            # Right after quantize() the packed modules hold FORMAT.GPTQ (v1) zero points
            # (stored as z - 1), but the torch kernel's dequantize expects v2 (z).  GPTQModel's
            # loader converts v1 -> v2 when it loads a checkpoint; do the same conversion here,
            # otherwise every weight is off by exactly one quantization step.
            if getattr(mod, "REQUIRES_FORMAT_V2", False) and mod.qzero_format() == 1:
                convert_gptq_v1_to_v2_format_module(mod, bits=mod.bits, pack_dtype=mod.pack_dtype)
                converted += 1
            with torch.no_grad():
                w = mod.dequantize_weight().T.float()  # [in, out] -> [out, in]
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise RuntimeError(f"{name}: dequantized shape {tuple(w.shape)}")
            deq[f"{name}.weight"] = w
            if getattr(mod, "bias", None) is not None:
                deq[f"{name}.bias"] = mod.bias.float()
            if name.endswith(("q_proj", "down_proj")):
                err = (_common.forward_matches(mod, w, getattr(mod, "bias", None),
                                                           dtype=mod.scales.dtype))
                worst = err if isinstance(err, str) or isinstance(worst, str) else max(worst, err)
            report.setdefault("kernel", type(mod).__name__)
            report.setdefault("packed_scales_dtype", str(mod.scales.dtype))
    report["forward_vs_dense_max_rel_err"] = worst
    report["qzeros_converted_v1_to_v2"] = converted
    out: dict[str, torch.Tensor] = {}
    for key, val in model.state_dict().items():
        if not val.is_floating_point():
            continue  # qweight/qzeros/g_idx (int) of the packed modules
        prefix = key.rsplit(".", 1)[0]
        if f"{prefix}.weight" in deq and key.rsplit(".", 1)[1] in ("scales",):
            continue
        out[key] = val
    out.update(deq)
    if not deq:
        raise RuntimeError("GPTQModel produced no quantized modules")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(("gptq",), argv)
    ids = _common.setup(args)
    # GPTQModel sizes its CPU worker pool as (cpu_count + 1) // 2 = 1 on a 2-core box, but its
    # fixed 'model_loader:cpu' virtual pool needs 2 -> ValueError at the first quantize step.
    # The documented override is GPTQMODEL_CPU_WORKERS; use >= 2 (kept if the caller set it).
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(group_size=args.group_size, **QCFG)
    qmodel = GPTQModel.load(str(args.model), quantize_config=qcfg, device="cpu", dtype=torch.float32)
    model = qmodel.model
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    calib = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]
    # The CPU packer is a C++ extension JIT-compiled on first use (~60 s on 2 cores) inside
    # quantize(); build/load it here so the timed region does not include a compile.
    import time

    from gptqmodel.utils.cpp import load_pack_block_extension

    t0 = time.perf_counter()
    ext_ok = load_pack_block_extension() is not None
    ext_s = time.perf_counter() - t0
    log.info("pack_block_cpu extension %s in %.1f s", "ready" if ext_ok else "UNAVAILABLE", ext_s)
    rec = _common.EmbeddingInputRecorder(model.get_input_embeddings())
    _measure.materialize(model)  # every arm: weights in private memory before the timed step
    rss_after_load = (_measure.trim_memory(), _measure.current_rss())[1]
    with _measure.RssSampler() as sampler:
        qmodel.quantize(calibration=calib, backend=BACKEND.GPTQ_TORCH, **QUANT_KW)
    rec.remove()
    log.info("GPTQModel gptq: %.1f s, peak RSS %.0f MiB", sampler.elapsed_s, sampler.peak / 2**20)
    calib_report = _common.check_uses_ids(rec.seen, ids, "GPTQModel")
    settings = {
        "quantize_config": _jsonable_cfg(qmodel.quantize_config),
        "requested": {**QCFG, "group_size": args.group_size},
        "quantize_kwargs": {**{k: v for k, v in QUANT_KW.items()}, "backend": "gptq_torch"},
        "block_size": BLOCKSIZE,
        "pack_block_cpu_ext": {"preloaded_outside_timing": ext_ok, "load_s": ext_s},
        "env_GPTQMODEL_CPU_WORKERS": os.environ["GPTQMODEL_CPU_WORKERS"],
        "qlinear_kernel": getattr(qmodel.qlinear_kernel, "__name__", str(qmodel.qlinear_kernel)),
        "subsets_per_layer": "[q,k,v] -> [o] -> [gate,up] -> [down] (true_sequential: each subset "
                             "re-runs the layer with earlier subsets already quantized)",
        "calibration_check": calib_report,
    }
    dense_report: dict = {}
    _common.finish(args, ids, sampler, rss_after_load, lambda: dense_state_dict(qmodel, dense_report),
                   settings, "gptqmodel", tied=tied, extra={"dense_check": dense_report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
