"""How much GPTQ's codes move when only the order of floating-point sums changes.

GPTQ is the same algorithm whatever the calibration chunk size, but the Hessian's sums (and so every
later rounding decision, through the error feedback) come out in a different order. This script
quantizes the first ``--layers`` decoder blocks of SmolLM2-135M twice with the default GPTQ settings,
once per ``--batch-sizes`` entry (sequences per forward chunk), on the same 32 x 256 calibration ids
(``stdlib_calib``, random windows, seed 0), and prints, for every Linear, the fraction of integer codes
that differ between the two runs.

    python scripts/gptq_code_spread.py                      # 2 layers, chunks of 4 vs 32 sequences
    python scripts/gptq_code_spread.py --layers 4 --batch-sizes 2,8
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

log = logging.getLogger("gptq_code_spread")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder blocks kept (from the first)")
    p.add_argument("--batch-sizes", default="4,32", help="two chunk sizes (sequences per forward)")
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if len(sizes) != 2:
        p.error("--batch-sizes takes exactly two values")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantlab.quantizers  # noqa: F401  (registers every method)
    from quantlab.calib.datasets import CalibConfig, build_calib
    from quantlab.formats.spec import QuantFormat
    from quantlab.models.smollm2 import ensure_smollm2
    from quantlab.quantizers.gptq import GPTQConfig, GPTQQuantizer
    from quantlab.types import RunContext
    from quantlab.utils.paths import cache_dir

    path = ensure_smollm2(cache_dir())
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    base.model.layers = base.model.layers[:args.layers]
    base.config.num_hidden_layers = args.layers
    tok = AutoTokenizer.from_pretrained(str(path))
    calib = build_calib(CalibConfig(source="local", path="stdlib_calib", sampling="random_windows",
                                    n_samples=32, seqlen=256, seed=0), tok)
    codes = []
    for bs in sizes:
        cfg = GPTQConfig(format=QuantFormat(bits=4, group_size=args.group_size, zero_in_range=True), batch_size=bs)
        with tempfile.TemporaryDirectory() as out:
            ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=out, tokenizer=tok, calib=calib,
                             keep_codes=True)
            res = GPTQQuantizer(cfg).quantize(copy.deepcopy(base), calib, ctx)
        codes.append({k: v.codes for k, v in res.codes.items()})
    print(f"GPTQ w4 g{args.group_size} (defaults), SmolLM2-135M first {args.layers} blocks, 32 x 256 stdlib_calib: "
          f"fraction of codes that differ, {sizes[0]} vs {sizes[1]} sequences per chunk")
    for name in codes[0]:
        diff = (codes[0][name] != codes[1][name]).float().mean().item()
        print(f"{name:42s} {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
