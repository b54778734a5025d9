"""The logit errors behind tests/test_deploy.py's tolerances: each export format of the tiny model, loaded back
by quantlab (reference and cpu backends) and, when ``optimum`` + ``gptqmodel`` import, by transformers, against
the fake-quant model. Same models and calibration as the tests (it reuses their setup).

    python scripts/export_roundtrip_errors.py
    PYTHONPATH=/path/to/gptqmodel/site python scripts/export_roundtrip_errors.py   # + the transformers arm

Error = max |logits - fake-quant logits| / max |fake-quant logits| on the tests' fixed batch.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import test_deploy as T  # noqa: E402  (the tests' models, calibration and batch)

from quantlab.deploy.export import write_checkpoint  # noqa: E402
from quantlab.models.loaders import ModelConfig, load_model  # noqa: E402
from quantlab.nn.packed import set_backend  # noqa: E402


def _err(y, ref) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def _bf16_emulation(model) -> None:
    """Every packed layer computes what torch's int4 kernel computes, in plain torch: bf16 activations, scales
    and zero terms ``(8 - z) * s`` (:mod:`quantlab.formats.layouts.aten_int4`), bf16 output."""
    import torch
    import torch.nn.functional as F

    from quantlab.nn.packed import packed_modules

    def forward(self, x):
        qw = self.quantized()
        gi = qw.group_index().long()
        s = qw.scales.to(torch.bfloat16).float()[:, gi]
        zterm = ((8 - qw.zeros) * qw.scales).to(torch.bfloat16).float()[:, gi]
        w = (qw.codes.float() - 8) * s + zterm
        return F.linear(x.to(torch.bfloat16).float(), w).to(torch.bfloat16).to(x.dtype)

    for _, mod in packed_modules(model):
        mod.forward = forward.__get__(mod)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    hf_ok = all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))
    print("| format | method | quantlab reference | quantlab cpu | cpu's bf16 rounding in plain torch | "
          "transformers (+gptqmodel) |")
    print("|---|---|---:|---:|---:|---:|")
    for fmt, method in (("compressed-tensors", "rtn"), ("gptq", "gptq_act_order"), ("awq", "awq")):
        with tempfile.TemporaryDirectory() as tmp:
            model, tok, res = T._quantized(T.METHODS[method](), Path(tmp))
            fake = T._logits(model)
            out = write_checkpoint(model, tok, res.codes, Path(tmp) / "x", fmt)
            ours = load_model(ModelConfig(name=fmt, path=str(out), dtype="float32", device="cpu")).model
            ref = _err(T._logits(ours), fake)
            set_backend(ours, "cpu")
            cpu = _err(T._logits(ours), fake)
            set_backend(ours, "reference")
            _bf16_emulation(ours)
            emu = _err(T._logits(ours), fake)
            hf = "not installed"
            if hf_ok and fmt != "compressed-tensors":
                from transformers import AutoModelForCausalLM

                hf = f"{_err(T._logits(AutoModelForCausalLM.from_pretrained(out, device_map='cpu')), fake):.4f}"
            elif fmt == "compressed-tensors":
                hf = "exact (tests assert torch.equal)"
            print(f"| {fmt} | {method} | {ref:.4g} | {cpu:.4g} | {emu:.4g} | {hf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
