"""fp32 GEMM rate of this machine on a model's Linear shapes (the arithmetic floor used in the README).

    python scripts/gemm_rate.py                        # SmolLM2-135M MLP shapes, 1024 tokens
    python scripts/gemm_rate.py --tokens 2048 --shapes 576x1536,1536x576
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--shapes", default="576x1536,1536x576", help="in x out of each Linear")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.tokens} tokens")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        x, w = torch.randn(args.tokens, k), torch.randn(n, k)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        t = time.perf_counter()
        for _ in range(args.reps):
            torch.nn.functional.linear(x, w)
        dt = (time.perf_counter() - t) / args.reps
        print(f"{args.tokens} x {k} by {k} x {n}: {2 * args.tokens * k * n / dt / 1e9:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
