"""Sanity check of a peer's dense weights.safetensors (run with quantlab's venv).

Loads the base HF model, overlays the dense state dict (strict=False, reporting
missing/unexpected keys), checks every decoder Linear weight:
  * GPTQ (``--strict-grid``): at most 2**bits distinct values per row-group of
    ``--group-size`` input columns;
  * all: the weight differs from the original;
and compares perplexity on a token file (fp vs dense).  Prints one JSON object.

  .venv/bin/python scripts/peers/check_dense.py --model DIR --weights OUT/weights.safetensors \
      --eval-tokens eval.npy [--strict-grid] [--group-size 64] [--max-ratio 2.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure

log = logging.getLogger("quantlab.peers.check")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def max_distinct_per_group(w: torch.Tensor, group: int) -> int:
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    s, _ = torch.sort(g, dim=-1)
    distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
    return int(distinct.max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--weights", required=True, type=Path)
    ap.add_argument("--eval-tokens", type=Path)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--strict-grid", action="store_true")
    ap.add_argument("--max-ratio", type=float, default=2.0, help="fail if ppl_q / ppl_fp exceeds this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    sd = load_file(str(args.weights))
    rep: dict = {"weights": str(args.weights), "n_tensors": len(sd)}
    ppl_fp = None
    if args.eval_tokens:
        ids = _measure.load_tokens(args.eval_tokens)
        ppl_fp = perplexity(model, ids)
    res = model.load_state_dict(sd, strict=False)
    rep["missing_keys"] = list(res.missing_keys)
    rep["unexpected_keys"] = list(res.unexpected_keys)
    problems = []
    if res.unexpected_keys:
        problems.append("unexpected keys")
    missing = [k for k in res.missing_keys if k != "lm_head.weight"]
    if missing:
        problems.append(f"missing keys {missing[:4]}")
    worst, n_lin, unchanged, bias = 0, 0, [], 0.0
    changed_other = []
    for key, w in sd.items():
        if key.endswith(".weight") and key.split(".")[-2] in LINEARS:
            n_lin += 1
            worst = max(worst, max_distinct_per_group(w, args.group_size))
            # mean error in units of mean |w|: ~0 for a sane quantizer, ~0.4 for an off-by-one zero
            bias = max(bias, abs(float((w - orig[key]).mean() / orig[key].abs().mean())))
            if torch.equal(w, orig[key]):
                unchanged.append(key)
        elif not torch.equal(w, orig[key]):
            changed_other.append(key)
    rep.update(n_linear=n_lin, max_distinct_per_group=worst, max_abs_mean_err_rel=bias, unchanged_linears=unchanged,
               changed_non_linear=changed_other[:8], n_changed_non_linear=len(changed_other))
    if args.strict_grid and worst > 2 ** args.bits:
        problems.append(f"{worst} distinct values in a group > {2 ** args.bits}")
    if unchanged:
        problems.append(f"{len(unchanged)} linears unchanged")
    if ppl_fp is not None:
        ppl_q = perplexity(model, ids)
        rep.update(ppl_fp=ppl_fp, ppl_q=ppl_q, ppl_ratio=ppl_q / ppl_fp, eval_shape=list(ids.shape))
        if not ppl_q / ppl_fp < args.max_ratio:
            problems.append(f"ppl ratio {ppl_q / ppl_fp:.3f} >= {args.max_ratio}")
    rep["problems"] = problems
    rep["ok"] = not problems
    print(json.dumps(rep, indent=1))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
