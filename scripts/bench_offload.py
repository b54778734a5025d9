"""Memory of quantizing a model in memory vs. with its weights offloaded to disk (``model.offload=disk``).

A synthetic Llama (random weights, seeded; TinyLlama-1.1B's shape by default: hidden 2048, intermediate
5632, 22 layers, 32 heads / 4 KV heads, SmolLM2's 49152-token tokenizer, untied lm_head: 1.17e9
parameters, 4.36 GiB in float32) is built once and saved as sharded safetensors under the quantlab cache.
Then, for each method (GPTQ, AWQ, SmoothQuant+) and each mode, one fresh ``python -m quantlab`` process
quantizes it and evaluates a short perplexity; the modes alternate (memory, disk, memory, ...). From each
run's record the table shows:

* ``quant peak RSS``: the process's resident memory sampled every 10 ms *during the quantization step*
  (:class:`quantlab.tracking.rss.RssSampler`; anon = anonymous memory, file = mapped checkpoint pages);
* ``/ model``: that peak over the model's bytes (float32 parameters), the issue's targets being <= 1.3x in
  memory and < 1.0x offloaded;
* ``process peak``: ``ru_maxrss`` of the whole process (loading and evaluation included);
* quantization time and the perplexity (the same in both modes: offloading changes where weights live,
  not the arithmetic).

    python scripts/bench_offload.py                           # 1.17B, 3 methods x 2 modes: 6 runs of 13-28 min
                                                              # on 2 shared cores (OMP_NUM_THREADS=1)
    python scripts/bench_offload.py --shape small --methods gptq   # 0.06B smoke run (~1 min)
    python scripts/bench_offload.py --json results/bench/offload.json
    python scripts/bench_offload.py --table-from a.json b.json  # one table from earlier runs' JSON
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

log = logging.getLogger("bench_offload")

SHAPES = {  # TinyLlama-1.1B's decoder; "small" for a smoke run
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2),
}
# Quantizer overrides. Coarse search grids bound the CPU time (AWQ with its defaults takes hours per 1B model on
# 2 cores). AWQ's grid does not change its memory: it walks the scale candidates one after another and its clip
# search evaluates candidates in batches of a fixed number of values (CLIP_BATCH_ELEMS) whatever the grid.
# SmoothQuant+'s does: its search carries one activation stream per candidate of a wave (quantizer.alpha_batch,
# default all): 6 here (alpha 0, .25, .5, .75, 1 and the RTN baseline), 22 with the default step 0.05, i.e.
# 16 x tokens x hidden x 4 bytes more (16 x 2048 x 2048 x 4 B = 0.25 GiB at the defaults below).
METHODS = {
    "gptq": ["quantizer=gptq"],
    "awq": ["quantizer=awq", "quantizer.n_grid=4", "quantizer.clip_n_grid=4"],
    "smoothquant_plus": ["quantizer=smoothquant_plus", "quantizer.alpha_step=0.25"],
}


def build_synthetic(shape: str, seed: int = 0) -> Path:
    """The synthetic checkpoint (built on first use): sharded float32 safetensors + SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantlab.models.smollm2 import ensure_smollm2
    from quantlab.utils.paths import cache_dir

    folder = cache_dir() / "synthetic" / f"llama-{shape}-seed{seed}"
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(ensure_smollm2(cache_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[shape])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)  # HF init: normal(0, 0.02) Linears and embeddings
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + "-", dir=folder.parent if folder.parent.exists() else None))
    model.save_pretrained(tmp, max_shard_size="1GB")
    tok.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    log.info("built %s (%.2fe9 params)", folder, sum(p.numel() for p in model.parameters()) / 1e9)
    return folder


def run_one(folder: Path, method: str, mode: str, results: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``python -m quantlab`` run; its record's figures (or the failure)."""
    exp = f"bench_offload_{method}_{mode}"
    cmd = [sys.executable, "-m", "quantlab", "model=llama2_7b", f"model.path={folder}",
           f"model.name=synthetic_llama_{args.shape}", "model.dtype=float32", "model.device=cpu",
           "+model.note='synthetic random weights, a quantization memory benchmark'",
           f"model.offload={'disk' if mode == 'disk' else 'null'}", *METHODS[method],
           "calib=random_8x64", f"calib.n_samples={args.samples}", f"calib.seqlen={args.seqlen}",
           "eval=[ppl_local]", f"eval.ppl_local.max_windows={args.ppl_windows}", f"experiment={exp}", "logger=none"]
    env = {**os.environ, "QUANTLAB_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    log.info("%s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    recs = sorted(results.rglob(f"{exp}/*/result.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not recs:
        return {"method": method, "mode": mode, "status": "failed", "error": proc.stderr[-1500:]}
    rec = json.loads(recs[-1].read_text())
    mem = rec["peak_memory"]
    model_bytes = rec["model"]["n_params"] * 4
    ppl = next((v for k, v in rec["metrics"].items() if k.startswith("ppl")), None)
    return {"method": method, "mode": mode, "status": rec["status"], "model_gb": model_bytes / 1024**3,
            "quant_peak_gb": mem["quantize_peak_rss_gb"], "quant_peak_anon_gb": mem.get("quantize_peak_rss_anon_gb"),
            "quant_peak_file_gb": mem.get("quantize_peak_rss_file_gb"), "quant_start_gb": mem["quantize_start_rss_gb"],
            "process_peak_gb": mem["peak_rss_gb"], "ratio": mem["quantize_peak_rss_gb"] * 1024**3 / model_bytes,
            "quant_s": rec["quant_time_s"], "ppl": ppl, "calib_tokens": args.samples * args.seqlen,
            "run_dir": str(recs[-1].parent)}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | mode | model GiB | quant peak RSS GiB (anon + file) | / model | start GiB | process peak GiB "
            "| quant s | ppl | target |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['mode']} | FAILED: {r.get('error', '')[-200:]!r} |")
            continue
        limit = 1.3 if r["mode"] == "memory" else 1.0
        ok = r["ratio"] <= limit if r["mode"] == "memory" else r["ratio"] < limit
        parts = f"{r['quant_peak_anon_gb']:.2f} + {r['quant_peak_file_gb']:.2f}" if r["quant_peak_anon_gb"] else "-"
        lines.append(f"| {r['method']} | {r['mode']} | {r['model_gb']:.2f} | {r['quant_peak_gb']:.2f} ({parts}) | "
                     f"{r['ratio']:.2f}x | {r['quant_start_gb']:.2f} | {r['process_peak_gb']:.2f} | {r['quant_s']:.0f} | "
                     f"{r['ppl']:.4f} | {'<=' if r['mode'] == 'memory' else '<'} {limit}x {'PASS' if ok else 'MISS'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--modes", nargs="+", choices=("memory", "disk"), default=["memory", "disk"])
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences (random token ids)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=2, help="512-token windows of the local perplexity")
    ap.add_argument("--results", type=Path, default=None, help="run records (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table-from", type=Path, nargs="+", default=None, help="print the table of these --json files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table_from:
        return print_tables([json.loads(p.read_text()) for p in args.table_from])
    folder = build_synthetic(args.shape)
    results = args.results or Path(tempfile.mkdtemp(prefix="bench-offload-"))
    rows = []
    for i, method in enumerate(args.methods):
        modes = args.modes if i % 2 == 0 else list(reversed(args.modes))  # alternate which mode runs first
        for mode in modes:
            rows.append(run_one(folder, method, mode, results, args))
            log.info("%s", rows[-1])
    from quantlab.tracking.env import cpu_model

    result = {"date": str(_dt.date.today()), "cpu": f"{cpu_model()} ({os.cpu_count()} CPUs)", "shape": args.shape,
              "calibration": f"{args.samples}x{args.seqlen}", "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "results": str(results), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return print_tables([result])


def print_tables(results: list[dict[str, Any]]) -> int:
    """The table over every result's rows (with each result's machine and settings), the perplexity check,
    and 0 when every run succeeded."""
    rows = []
    for res in results:
        print(f"{res['date']} {res['cpu']}, OMP_NUM_THREADS={res.get('threads', 'default')}; synthetic Llama "
              f"{res.get('shape', '1b')} float32, {res.get('calibration', '8x256')} calibration tokens; "
              f"runs in {res.get('results', '?')}")
        rows += res["rows"]
    print()
    print(table(rows))
    for method in dict.fromkeys(r["method"] for r in rows):
        ppls = {r["mode"]: r["ppl"] for r in rows if r["method"] == method and r["status"] == "ok"}
        if len(ppls) == 2:
            print(f"{method}: perplexity memory {ppls['memory']!r} vs disk {ppls['disk']!r}: "
                  f"{'identical' if ppls['memory'] == ppls['disk'] else 'DIFFERENT'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
