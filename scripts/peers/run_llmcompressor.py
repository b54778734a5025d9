"""Quantize an HF Llama folder with llm-compressor (GPTQ or AWQ), W4 asym, group G.

Runs in the llmcompressor peer venv (see envs.py).  Writes OUT/weights.safetensors
(dense fp32, dequantized with compressed-tensors' own fake_quantize) and
OUT/result.json (timing, RSS, versions, every algorithm setting).

  python scripts/peers/run_llmcompressor.py --model DIR --tokens calib.npy \
      --method gptq|awq --group-size 64 --out OUT [--threads N]
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _measure

log = logging.getLogger("quantlab.peers.llmcompressor")

QPARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale")


def _weight_args(group_size: int, actorder):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=group_size, dynamic=False, actorder=actorder)


def _scheme(group_size: int, actorder) -> dict:
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=_weight_args(group_size, actorder),
                                          input_activations=None, output_activations=None)}


def build_recipe(method: str, group_size: int):
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=_scheme(group_size, "static"), ignore=["lm_head"],
                             block_size=128, dampening_frac=0.01, actorder="static")]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    # AWQ in 0.14 is a transform (scale search only) followed by the quantization
    # modifier that computes the qparams (min-max observer) for the scaled weights.
    return [AWQModifier(), QuantizationModifier(config_groups=_scheme(group_size, None),
                                                ignore=["lm_head"])]


def _dump(obj):
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def settings_from(recipe, model, oneshot_kwargs: dict, calib_report: dict) -> dict:
    qmods = [(n, m) for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    first_name, first = qmods[0]
    out: dict = {
        "scheme": {"weights": _dump(first.quantization_scheme.weights),
                   "input_activations": _dump(first.quantization_scheme.input_activations),
                   "example_module": first_name},
        "n_quantized_linears": len(qmods),
        "quantized_module_kinds": sorted({n.split(".")[-1] for n, _ in qmods}),
        "oneshot": {k: v for k, v in oneshot_kwargs.items() if k not in ("model", "dataset", "recipe")},
        "calibration_check": calib_report,
    }
    for mod in recipe:
        name = type(mod).__name__
        fields = {k: _dump(v) for k, v in mod.model_dump().items()
                  if k not in ("config_groups",)} if hasattr(mod, "model_dump") else {}
        if name == "AWQModifier":
            fields["resolved_mappings_layer0"] = [
                {"smooth": m.smooth_name, "balance": list(m.balance_names), "parent": m.parent_name}
                for m in getattr(mod, "_resolved_mappings", [])[:4]] or "cleared after finalize"
            fields["grid"] = [list(p) for p in mod._get_grid_search_params()]
            fields["clip_search"] = False  # llm-compressor AWQ has no apply_clip step
        out[name] = fields
    return out


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """Base-model weights with quantized Linears replaced by compressed-tensors' qdq."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    qweights = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(mod, "weight_scale"):
            continue
        g_idx = getattr(mod, "weight_g_idx", None)
        if g_idx is not None and (g_idx != torch.arange(g_idx.numel()) // scheme.weights.group_size).any():
            raise RuntimeError(f"{name}: non-trivial g_idx; dense export does not handle it")
        with torch.no_grad():
            w = fake_quantize(mod.weight.detach().float(), mod.weight_scale.float(),
                              mod.weight_zero_point, scheme.weights)
        qweights[f"{name}.weight"] = w
    for key, val in model.state_dict().items():
        if key.endswith(QPARAM_SUFFIXES) or not val.is_floating_point():
            continue
        out[key] = qweights.get(key, val)
    missing = set(qweights) - set(out)
    if missing:
        raise RuntimeError(f"quantized weights without a state-dict key: {sorted(missing)[:4]}")
    return out


def cpu_only_patches() -> list[str]:
    """Work around llm-compressor code paths that assume an accelerator exists.

    0.14.0.1's AWQ pins the cached layer inputs before each grid search
    (IntermediatesCache.pin_memory), which raises "Cannot access accelerator device
    when none is available" on a CPU-only torch.  Pinning only speeds up host->device
    copies, so on a CPU-only machine it is replaced by a no-op.
    """
    applied = []
    if not torch.accelerator.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        applied.append("IntermediatesCache.pin_memory -> no-op (CPU-only torch cannot pin memory)")
    for msg in applied:
        log.warning("patch: %s", msg)
    return applied


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(("gptq", "awq"), argv)
    ids = _common.setup(args)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model.eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    patches = cpu_only_patches()
    recipe = build_recipe(args.method, args.group_size)
    oneshot_kwargs = dict(model=model, tokenizer=str(args.model), dataset=ds, recipe=recipe,
                          num_calibration_samples=n, max_seq_length=seqlen, batch_size=1,
                          shuffle_calibration_samples=False, pipeline="sequential",
                          data_collator="truncation", quantization_aware_calibration=True,
                          sequential_offload_device="cpu", tie_word_embeddings=True,
                          precision="auto")
    rec = _common.EmbeddingInputRecorder(model.get_input_embeddings())
    _measure.materialize(model)  # every arm: weights in private memory before the timed step
    rss_after_load = (_measure.trim_memory(), _measure.current_rss())[1]
    with _measure.RssSampler() as sampler:
        model = oneshot(**oneshot_kwargs) or model
    rec.remove()
    log.info("llm-compressor %s: %.1f s, peak RSS %.0f MiB", args.method, sampler.elapsed_s,
             sampler.peak / 2**20)
    calib_report = _common.check_uses_ids(rec.seen, ids, "llm-compressor")
    settings = settings_from(recipe, model, oneshot_kwargs, calib_report)
    settings["cpu_only_patches"] = patches
    settings["pipeline_note"] = (
        "sequential pipeline: per decoder layer one calibration pass caches inputs; all Linears of "
        "the layer get their Hessians/activation stats from that pass (not true-sequential inside "
        "the layer); the layer is then re-run with quantized weights to feed the next layer "
        "(quantization_aware_calibration=True)")
    if args.method == "gptq":
        settings["qparams_note"] = ("scale/zero-point of each group computed once by the weight observer "
                                    "on the pre-GPTQ weights (static groups), then GPTQ column updates")
    _common.finish(args, ids, sampler, rss_after_load, lambda: dense_state_dict(model), settings,
                   "llmcompressor", extra={"compressed_tensors": _measure.versions("compressed-tensors")
                                           ["compressed-tensors"]}, tied=tied)
    return 0


if __name__ == "__main__":
    sys.exit(main())
