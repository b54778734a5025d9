"""Quantize an HF Llama folder with AutoAWQ 0.2.9 (AWQ), W4 asym (zero point), group G.

Runs in the autoawq peer venv (transformers 4.51.x, see envs.py).  The dense
fp32 weights are the full state dict after AWQ (scaled norms / up_proj included)
with each WQLinear_GEMM dequantized by AutoAWQ's own
``awq.utils.packing_utils.dequantize_gemm``.  Writes OUT/weights.safetensors and
OUT/result.json.

  python scripts/peers/run_autoawq.py --model DIR --tokens calib.npy \
      --method awq --group-size 64 --out OUT [--threads N]
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _measure

log = logging.getLogger("quantlab.peers.autoawq")

QUANTIZE_KW = dict(duo_scaling=True, apply_clip=True, export_compatible=False,
                   n_parallel_calib_samples=None, max_chunk_memory=1024 * 1024 * 1024)


def compat_model_dir(model_dir: Path, tmp: Path) -> tuple[Path, dict]:
    """A view of ``model_dir`` that transformers 4.x reads correctly.

    The folder is written by transformers 5 (``rope_parameters``), which 4.51 does
    not read: it would silently use rope_theta=1e4 instead of the model's value;
    and its tokenizer_class ``TokenizersBackend`` does not exist in 4.x.  (The
    tokenizer is not used on token-id calibration data, but quantize() takes one.)
    Returns ``model_dir`` itself when nothing needs fixing, else ``tmp`` holding
    symlinks to every file plus a config.json with ``rope_theta`` added.
    """
    raw = json.loads((model_dir / "config.json").read_text())
    rope = raw.get("rope_parameters") or {}
    fixes = {}
    if "rope_theta" not in raw and "rope_theta" in rope:
        fixes["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in raw:
        raise RuntimeError(f"rope_parameters {rope} not mapped for transformers 4.x")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend":  # transformers-5 name for the fast tokenizer
        fixes["tokenizer_class"] = "PreTrainedTokenizerFast"
    if not fixes:
        return model_dir, fixes
    tmp.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (tmp / f.name).symlink_to(f.resolve())
    cfg_fix = {k: v for k, v in fixes.items() if k != "tokenizer_class"}
    (tmp / "config.json").write_text(json.dumps({**raw, **cfg_fix}, indent=2))
    if tok_cfg:
        tok_fix = {"tokenizer_class": fixes["tokenizer_class"]} if "tokenizer_class" in fixes else {}
        (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, **tok_fix}, indent=2))
    log.warning("transformers-4 view of %s in %s with %s", model_dir, tmp, fixes)
    return tmp, fixes


def cpu_safe_quantizer_cls():
    """AwqQuantizer with the scale search's weight snapshot made a real copy.

    AwqQuantizer._compute_best_scale (0.2.9) snapshots the block with
    ``org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}`` and
    restores it after each grid point.  On a CPU model ``.cpu()`` returns the same
    tensor, so the first grid point's in-place ``fc.weight.mul_(scales)`` also
    rewrites the snapshot: every later grid point and the final weights start from
    W * s(ratio=0) instead of W (effective weights off by ~50%).  On GPU the
    snapshot is a copy, so cloning here restores the intended algorithm exactly.
    """
    from awq.quantize.quantizer import AwqQuantizer

    class CpuSafeAwqQuantizer(AwqQuantizer):
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
            original = module2inspect.state_dict

            def cloned_state_dict(*a, **k):
                return {name: t.clone() for name, t in original(*a, **k).items()}

            module2inspect.state_dict = cloned_state_dict
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, *args, **kwargs)
            finally:
                del module2inspect.state_dict

    return CpuSafeAwqQuantizer


def dense_state_dict(model, report: dict) -> dict[str, torch.Tensor]:
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    deq: dict[str, torch.Tensor] = {}
    worst: float | str = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, WQLinear_GEMM):
            w = dequantize_gemm(mod.qweight, mod.qzeros, mod.scales, mod.w_bit, mod.group_size)
            w = w.T.float()  # [in, out] -> [out, in]
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise RuntimeError(f"{name}: dequantized shape {tuple(w.shape)}")
            deq[f"{name}.weight"] = w
            if mod.bias is not None:
                deq[f"{name}.bias"] = mod.bias.float()
            if name.endswith(("q_proj", "down_proj")):
                err = (_common.forward_matches(mod, w, mod.bias, dtype=mod.scales.dtype))
                worst = err if isinstance(err, str) or isinstance(worst, str) else max(worst, err)
        elif type(mod).__name__.startswith("WQLinear"):
            raise RuntimeError(f"{name}: unexpected {type(mod).__name__}")
    report["forward_vs_dense_max_rel_err"] = worst
    report["packed_scales_dtype"] = str(next(m for m in model.modules()
                                             if isinstance(m, WQLinear_GEMM)).scales.dtype)
    if not deq:
        raise RuntimeError("AutoAWQ produced no WQLinear modules")
    out = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    for key in list(out):
        prefix, leaf = key.rsplit(".", 1)
        if f"{prefix}.weight" in deq and leaf == "scales":
            del out[key]
    out.update(deq)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(("awq",), argv)
    ids = _common.setup(args)
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="autoawq-model-"))
    try:
        model_dir, fixes = compat_model_dir(args.model, tmp / "model")
        awq_model = AutoAWQForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                                       device_map=None, safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = awq_model.model
    if "rope_theta" in fixes and model.config.rope_theta != fixes["rope_theta"]:
        raise RuntimeError("config fix did not reach the loaded model")
    if next(model.parameters()).dtype != torch.float32:
        raise RuntimeError(f"model loaded as {next(model.parameters()).dtype}")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n, seqlen = ids.shape
    quant_config = {"zero_point": True, "q_group_size": args.group_size, "w_bit": 4, "version": "GEMM"}
    calib = [row.tolist() for row in ids]
    rec = _common.EmbeddingInputRecorder(model.get_input_embeddings())
    _measure.materialize(model)  # every arm: weights in private memory before the timed step
    rss_after_load = (_measure.trim_memory(), _measure.current_rss())[1]
    with _measure.RssSampler() as sampler:
        awq_model.quantize(tokenizer, quant_config=quant_config, calib_data=calib,
                           max_calib_samples=n, max_calib_seq_len=seqlen,
                           quantizer_cls=cpu_safe_quantizer_cls(), **QUANTIZE_KW)
    rec.remove()
    log.info("AutoAWQ awq: %.1f s, peak RSS %.0f MiB", sampler.elapsed_s, sampler.peak / 2**20)
    calib_report = _common.check_uses_ids(rec.seen, ids, "AutoAWQ")
    q = awq_model.quantizer
    settings = {
        "quant_config": awq_model.quant_config.to_dict(),
        "quantize_kwargs": {**QUANTIZE_KW, "max_calib_samples": n, "max_calib_seq_len": seqlen},
        "quantizer": {k: getattr(q, k) for k in ("w_bit", "group_size", "zero_point", "version",
                                                  "duo_scaling", "apply_clip", "export_compatible",
                                                  "n_parallel_calib_samples", "max_calib_samples",
                                                  "max_calib_seq_len", "max_chunk_memory",
                                                  "modules_to_not_convert")},
        # hard-coded in awq/quantize/quantizer.py 0.2.9 (no arguments for them)
        "scale_search": {"n_grid": 20, "ratios": "i/20 for i in 0..19",
                         "duo_scaling_formula": "s = x_mean^r / w_mean^(1-r), normalized by sqrt(max*min)",
                         "loss": "MSE of the block (self_attn / mlp / linear) output, fp vs Q(W*s)/s"},
        "clip_search": {"enabled": QUANTIZE_KW["apply_clip"], "n_grid": 20, "max_shrink": 0.5,
                        "n_sample_token": 512, "skipped": ["q_proj", "k_proj"],
                        "oc_batch_size": "256 if out%256==0 else 64"},
        "mappings": ["input_layernorm -> [q,k,v] (inspect self_attn)",
                     "v_proj -> [o_proj] only if shapes equal (skipped for this GQA model: v 192x576, o 576x576)",
                     "post_attention_layernorm -> [gate,up] (inspect mlp)", "up_proj -> [down_proj]"],
        "calibration_batching": "all n samples in one [n, seqlen] forward per block "
                                "(n_parallel_calib_samples=None)",
        "next_layer_inputs": "computed from the FP (unscaled, unquantized) layer output",
        "apply_quant_dtype": "Linear cast to float16 before the final pseudo-quantization "
                             "(AwqQuantizer._apply_quant: .half()); scales stored fp16",
        "config_fixes": fixes,
        "cpu_fix": "quantizer_cls=CpuSafeAwqQuantizer: the scale search's org_sd snapshot is cloned "
                   "(0.2.9 aliases it on CPU via .cpu(), corrupting weights to W*s(ratio 0))",
        "calibration_check": calib_report,
    }
    dense_report: dict = {}
    _common.finish(args, ids, sampler, rss_after_load, lambda: dense_state_dict(model, dense_report),
                   settings, "autoawq", tied=tied, extra={"dense_check": dense_report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
