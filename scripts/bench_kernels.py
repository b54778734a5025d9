"""Kernel and decode benchmark for the packed W4A16 Linear (:class:`quantlab.nn.packed.PackedLinear`).

Two parts, in one run:

1. **Kernel micro-benchmark.** ``y = x W^T`` for Llama-7B shapes (4096x4096, 11008x4096, 4096x11008) and
   SmolLM2 shapes (576x576, 1536x576, 576x1536, 192x576), N x K, batch M in {1, 4, 16}. CPU arms, run
   interleaved (round-robin, the order rotating every round) and reported as the median per-call time:

   * ``fp32``      ``F.linear`` on fp32 x and weight;
   * ``bf16``      ``F.linear`` on bf16 x and weight;
   * ``int4``      ``PackedLinear(backend="cpu")`` called on fp32 x, as a user of an fp32 model calls it
                   (the module casts x to bf16, runs torch's ``_weight_int4pack_mm_for_cpu`` and casts back);
   * ``int4_op``   the raw aten op on a bf16 x (the difference to ``int4`` is the module's casts/reshapes).

   RTN, asymmetric, 4 bits, ``--group-size`` (128) for the Llama shapes and ``--small-group-size`` (64) for
   SmolLM2's (576 % 128 != 0). ``relerr`` is ``max|y_cpu - y_ref| / max|y_ref|`` of the ``cpu`` backend
   against the ``reference`` backend (fp32 dequantize + ``F.linear``) on the same fp32 x.
   With CUDA: ``fp16`` ``F.linear`` vs ``PackedLinear(backend="triton")`` on fp16 x and, if vLLM imports,
   vLLM's Marlin GPTQ GEMM (``gptq_marlin_gemm``, called ``marlin_gemm`` in recent vLLM) on its own
   symmetric uint4b8 RTN weight of the same shape.

2. **Decode benchmark.** A synthetic Llama (random weights, hidden 4096, intermediate 11008, 32 heads,
   ``--layers`` layers, vocab 32000) at batch 1, greedy ``generate`` with ``min_new_tokens =
   max_new_tokens``: fp32, bf16, int4 in an fp32 model and int4 in a bf16 model (RTN w4 g128 codes of every
   decoder Linear, packed with backend ``cpu``; lm_head and embeddings stay dense). Decode time excludes the
   prefill: ``median t(generate N+1 tokens) - median t(generate 1 token)`` (both include the same prefill
   and first token), so decode tokens/s = ``N / difference``. Arms run interleaved across repeats. Since the
   dense lm_head (32000x4096) is a large share of a 2-layer model's per-token work, the script also times
   the lm_head GEMV alone and prints an *estimate* for 32 layers:
   ``t_token(32) = t_lm_head + 32 * (t_token - t_lm_head) / layers``.

Targets (from the issue): CPU M=1 4096x4096: int4 >= 3.5x fp32 and >= 3.0x bf16; GPU M=1: Triton >= 3x fp16;
decode: int4 >= 2.5x bf16 tokens/s. Each is printed with PASS/MISS.

Timings are wall-clock medians; on a shared machine run it alone if you can and compare ratios, not
absolute times. ``--threads`` sets ``torch.set_num_threads`` (default: torch's current value).

    python scripts/bench_kernels.py --threads 1                  # ~5 min (2-core shared VM, load ~4)
    python scripts/bench_kernels.py --quick --threads 1          # ~2 min there (1 decode layer)
    python scripts/bench_kernels.py --json results/bench/kernels.json --threads 1
    python scripts/bench_kernels.py --skip-decode                # kernels only
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import inspect
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quantlab.formats import affine  # noqa: E402
from quantlab.formats.codes import QuantizedWeight, from_format  # noqa: E402
from quantlab.formats.layouts import aten_int4  # noqa: E402
from quantlab.formats.spec import QuantFormat  # noqa: E402
from quantlab.nn.packed import PackedLinear, pack_linears  # noqa: E402
from quantlab.tracking.env import cpu_capability, cpu_model  # noqa: E402

log = logging.getLogger("bench_kernels")

LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) = (out, in)
SMOLLM2_SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]
BATCHES = [1, 4, 16]
TARGET_SHAPE = (4096, 4096)
CPU_TARGET_VS_FP32, CPU_TARGET_VS_BF16 = 3.5, 3.0
GPU_TARGET_VS_FP16 = 3.0
DECODE_TARGET_VS_BF16 = 2.5


# ---------------------------------------------------------------------------------------------- helpers
def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fmt_fmt(group_size: int) -> QuantFormat:
    return QuantFormat(bits=4, group_size=group_size, symmetric=False, zero_in_range=False, symmetric_grid="full")


def rtn_codes(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """RTN w4 asymmetric codes of an fp32 weight (N, K)."""
    f = fmt_fmt(group_size)
    q, scale, zero = affine.quantize_weight(w.float(), f)
    return from_format(q, scale, zero, f)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bench_interleaved(fns: dict[str, Callable[[], Any]], budget_s: float, min_rounds: int,
                      block_s: float = 2e-3, max_rounds: int = 400, sync: Callable[[], None] | None = None,
                      warmup: int = 3) -> dict[str, dict[str, float]]:
    """Time every callable of ``fns`` interleaved: each round runs one block of calls per arm, the arm order
    rotating by one every round. A block is ``inner`` back-to-back calls (``inner`` chosen so a block takes
    about ``block_s``); a sample is block time / inner. Returns per arm: median_us, min_us, p90_us,
    n_iter (calls timed), rounds."""
    sync = sync or (lambda: None)
    names = list(fns)
    est: dict[str, float] = {}
    for n in names:
        for _ in range(warmup):
            fns[n]()
        sync()
        reps, t0 = 0, time.perf_counter()
        while True:  # estimate one call's time over >= 3 calls or >= 5 ms
            fns[n]()
            reps += 1
            if reps >= 3 and time.perf_counter() - t0 > 5e-3:
                break
            if reps >= 200:
                break
        sync()
        est[n] = (time.perf_counter() - t0) / reps
    inner = {n: max(1, math.ceil(block_s / max(est[n], 1e-9))) for n in names}
    round_s = sum(inner[n] * est[n] for n in names)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            f, k = fns[n], inner[n]
            sync()
            t0 = time.perf_counter_ns()
            for _ in range(k):
                f()
            sync()
            samples[n].append((time.perf_counter_ns() - t0) / 1e3 / k)
    out = {}
    for n in names:
        s = sorted(samples[n])
        out[n] = {"median_us": statistics.median(s), "min_us": s[0], "p90_us": s[min(len(s) - 1, int(0.9 * len(s)))],
                  "n_iter": rounds * inner[n], "rounds": rounds}
    return out


def verdict(value: float | None, target: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return "PASS" if value >= target else "MISS"


# ---------------------------------------------------------------------------------------------- part 1: CPU
def cpu_kernel_rows(shapes: list[tuple[int, int]], batches: list[int], args: argparse.Namespace,
                    meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        g = args.group_size if k % args.group_size == 0 else args.small_group_size
        w = torch.randn(n, k, generator=gen) * 0.02
        qw = rtn_codes(w, g)
        mod = PackedLinear(qw, None, torch.float32, backend="reference")
        w32, w16 = w.contiguous(), w.to(torch.bfloat16).contiguous()
        for m in batches:
            x32 = torch.randn(m, k, generator=gen)
            xb = x32.to(torch.bfloat16)
            mod.set_backend("reference")
            y_ref = mod(x32)
            mod.set_backend("cpu")
            err = rel_err(mod(x32), y_ref)
            packed, sz = mod.ws_int4, mod.ws_sz
            fns = {
                "fp32": lambda: F.linear(x32, w32),
                "bf16": lambda: F.linear(xb, w16),
                "int4": lambda: mod(x32),
                "int4_op": lambda: aten_int4.matmul(xb, packed, g, sz),
            }
            res = bench_interleaved(fns, args.budget, args.min_rounds)
            for arm, r in res.items():
                rows.append({"section": "kernel", "device": "cpu", "shape": f"{n}x{k}", "N": n, "K": k, "batch": m,
                             "group_size": g, "arm": arm, **r, "relerr_cpu_vs_reference": err, **meta})
            t = {a: res[a]["median_us"] for a in res}
            log.info("%5dx%-5d M=%-2d g%-3d fp32 %9.1f  bf16 %9.1f  int4 %9.1f  int4_op %9.1f us  "
                     "(%d rounds) relerr %.1e", n, k, m, g, t["fp32"], t["bf16"], t["int4"], t["int4_op"],
                     res["fp32"]["rounds"], err)
    return rows


def print_cpu_table(rows: list[dict[str, Any]], out: list[str]) -> None:
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["section"] == "kernel" and r["device"] == "cpu":
            by.setdefault((r["shape"], r["batch"]), {})[r["arm"]] = r
    out.append("")
    out.append("CPU kernel micro-benchmark: median us per call (interleaved arms); speedup = t_arm_ref / t_int4")
    out.append("  int4    = PackedLinear(backend='cpu') on fp32 x (casts to bf16 inside; what a user calls)")
    out.append("  int4_op = aten._weight_int4pack_mm_for_cpu on bf16 x (no casts); cast = int4 - int4_op")
    out.append("  relerr  = max|y_cpu - y_reference| / max|y_reference| (reference backend, fp32)")
    hdr = (f"| {'N x K':<11} | {'M':>2} | {'G':>3} | {'fp32':>9} | {'bf16':>9} | {'int4':>9} | {'int4_op':>9} | "
           f"{'cast':>7} | {'int4/fp32':>9} | {'int4/bf16':>9} | {'op/fp32':>7} | {'op/bf16':>7} | {'relerr':>7} | "
           f"{'iters':>12} |")
    out.append(hdr)
    out.append("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for (shape, m), a in by.items():
        t = {k: v["median_us"] for k, v in a.items()}
        iters = f"{a['fp32']['n_iter']}/{a['int4']['n_iter']}"
        out.append(f"| {shape:<11} | {m:>2} | {a['int4']['group_size']:>3} | {t['fp32']:>9.1f} | {t['bf16']:>9.1f} | "
                   f"{t['int4']:>9.1f} | {t['int4_op']:>9.1f} | {t['int4'] - t['int4_op']:>7.1f} | "
                   f"{t['fp32'] / t['int4']:>8.2f}x | {t['bf16'] / t['int4']:>8.2f}x | "
                   f"{t['fp32'] / t['int4_op']:>6.2f}x | {t['bf16'] / t['int4_op']:>6.2f}x | "
                   f"{a['int4']['relerr_cpu_vs_reference']:>7.1e} | {iters:>12} |")
    key = (f"{TARGET_SHAPE[0]}x{TARGET_SHAPE[1]}", 1)
    out.append("")
    if key in by:
        t = {k: v["median_us"] for k, v in by[key].items()}
        for arm, label in (("int4", "PackedLinear cpu, fp32 x"), ("int4_op", "raw aten op, bf16 x")):
            r32, r16 = t["fp32"] / t[arm], t["bf16"] / t[arm]
            out.append(f"TARGET cpu M=1 {key[0]} [{label}]: int4 vs fp32 {r32:.2f}x (target >= {CPU_TARGET_VS_FP32}x) "
                       f"{verdict(r32, CPU_TARGET_VS_FP32)}; int4 vs bf16 {r16:.2f}x (target >= "
                       f"{CPU_TARGET_VS_BF16}x) {verdict(r16, CPU_TARGET_VS_BF16)}")
    else:
        out.append(f"TARGET cpu M=1 {key[0]}: not measured (shape/batch not in this run)")


# ---------------------------------------------------------------------------------------------- part 1: GPU
def marlin_setup(w: torch.Tensor, group_size: int, x: torch.Tensor) -> tuple[Callable[[], Any] | None, str]:
    """A callable running vLLM's Marlin GPTQ GEMM on ``x`` (fp16, cuda) with an RTN uint4b8 version of ``w``
    (N, K), or None and why not. The op was renamed ``gptq_marlin_gemm`` -> ``marlin_gemm`` and its
    argument list changed between vLLM releases, so the call is bound by parameter name."""
    try:
        import vllm  # noqa: F401
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.model_executor.layers.quantization.utils import marlin_utils_test as mut
        from vllm.scalar_type import scalar_types
    except Exception as e:  # noqa: BLE001 (ImportError, or a vLLM build for another torch/CUDA)
        return None, f"not run: vllm not installed / not importable ({type(e).__name__}: {str(e)[:120]})"
    op = getattr(ops, "gptq_marlin_gemm", None)
    op_name = "gptq_marlin_gemm"
    if op is None:
        op, op_name = getattr(ops, "marlin_gemm", None), "marlin_gemm"
    if op is None:
        return None, "not run: vllm._custom_ops has neither gptq_marlin_gemm nor marlin_gemm"
    params = inspect.signature(op).parameters
    if "b_q_type" not in params and "b_q_type_id" not in params:
        return None, f"not run: vllm {op_name} has an unknown (pre-GPTQ-Marlin) signature {list(params)}"
    n, k = w.shape
    m = x.shape[0]
    qtype = scalar_types.uint4b8
    try:
        res = mut.marlin_quantize(w.t().contiguous().to(torch.float16).cuda(), qtype, group_size, act_order=False)
    except TypeError:
        res = mut.marlin_quantize(w.t().contiguous().to(torch.float16).cuda(), qtype, group_size, False)
    w_ref, q_w, s = res[0], res[1], res[2]
    g_idx = res[3] if len(res) > 4 else None
    sort_idx = res[4] if len(res) > 4 else None
    if hasattr(mut, "MarlinWorkspace"):
        ws = mut.MarlinWorkspace(n, mu.GPTQ_MARLIN_MIN_THREAD_N, mu.GPTQ_MARLIN_MAX_PARALLEL).scratch
    else:
        ws = mu.marlin_make_workspace_new(x.device)
    empty = torch.empty(0, dtype=torch.int32, device=x.device)
    values = {"a": x, "c": None, "b_q_weight": q_w, "b_bias": None, "b_scales": s, "a_scales": None,
              "global_scale": None, "b_zeros": None, "g_idx": g_idx, "perm": sort_idx, "workspace": ws,
              "b_q_type": qtype, "b_q_type_id": qtype.id, "size_m": m, "size_n": n, "size_k": k,
              "is_k_full": True, "has_zp": False, "num_bits": 4, "use_atomic_add": False,
              "use_fp32_reduce": True, "is_zp_float": False}
    kwargs = {}
    for name, p in params.items():
        if name in values:
            v = values[name]
            if v is None and "None" not in str(p.annotation) and "Optional" not in str(p.annotation):
                v = empty if name != "b_zeros" else torch.empty(0, dtype=torch.float16, device=x.device)
            kwargs[name] = v
        elif p.default is inspect.Parameter.empty:
            return None, f"not run: vllm {op_name} wants an argument this script does not know: {name!r}"
    try:
        y = op(**kwargs)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return None, f"not run: vllm {op_name} failed ({type(e).__name__}: {str(e)[:160]})"
    err = rel_err(y, x.float() @ w_ref.float())
    return (lambda: op(**kwargs)), f"vllm {op_name} (uint4b8 sym RTN g{group_size}), relerr vs its dequant {err:.1e}"


def gpu_kernel_rows(shapes: list[tuple[int, int]], batches: list[int], args: argparse.Namespace,
                    meta: dict[str, Any], out: list[str], device: str = "cuda") -> list[dict[str, Any]]:
    """fp16 ``F.linear`` vs the Triton backend (and vLLM Marlin) on ``device`` (``cpu`` only for a dry run of
    this code under ``TRITON_INTERPRET=1``)."""
    from quantlab.deploy.kernels import triton_available

    rows: list[dict[str, Any]] = []
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    gpu = torch.cuda.get_device_name() if on_cuda else f"{device} (dry run)"
    sync = torch.cuda.synchronize if on_cuda else None
    gen = torch.Generator().manual_seed(0)
    triton_ok = triton_available()
    if not triton_ok:
        out.append("GPU: triton arm not run: triton is not installed")
    notes: set[str] = set()
    for n, k in shapes:
        g = args.group_size if k % args.group_size == 0 else args.small_group_size
        w = torch.randn(n, k, generator=gen) * 0.02
        qw = rtn_codes(w, g)
        qwd = QuantizedWeight(qw.codes.to(dev), qw.scales.to(dev), qw.zeros.to(dev), qw.bits, qw.group_size,
                              qw.symmetric)
        w16 = w.to(dev, torch.float16)
        wdq = qwd.dequantize(torch.float32)
        mod = PackedLinear(qwd, None, torch.float16, backend="triton") if triton_ok else None
        for m in batches:
            x16 = torch.randn(m, k, generator=gen).to(dev, torch.float16)
            fns: dict[str, Callable[[], Any]] = {"fp16": lambda: F.linear(x16, w16)}
            err = float("nan")
            if mod is not None:
                err = rel_err(mod(x16), x16.float() @ wdq.t())
                fns["triton"] = lambda: mod(x16)
            mfn, why = marlin_setup(w, g, x16) if on_cuda else (None, "not run: needs CUDA")
            notes.add(why.split(", relerr")[0])
            if mfn is not None:
                fns["marlin"] = mfn
            res = bench_interleaved(fns, args.budget, args.min_rounds, block_s=5e-3, sync=sync)
            for arm, r in res.items():
                rows.append({"section": "kernel", "device": dev.type, "gpu": gpu,
                             "shape": f"{n}x{k}", "N": n, "K": k, "batch": m, "group_size": g, "arm": arm, **r,
                             "relerr_triton_vs_fp32_dequant": err, **meta})
            log.info("cuda %5dx%-5d M=%-2d %s", n, k, m, {a: round(r["median_us"], 1) for a, r in res.items()})
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["shape"], r["batch"]), {})[r["arm"]] = r
    out.append("")
    out.append(f"GPU kernel micro-benchmark ({gpu}): median us per call, fp16 x; relerr = triton vs fp32 "
               "x @ dequant(W)^T")
    for note in sorted(notes):
        out.append(f"  marlin: {note}")
    hdr = (f"| {'N x K':<11} | {'M':>2} | {'G':>3} | {'fp16':>8} | {'triton':>8} | {'marlin':>8} | "
           f"{'triton/fp16':>11} | {'marlin/fp16':>11} | {'relerr':>7} |")
    out.append(hdr)
    out.append("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for (shape, m), a in by.items():
        t = {k_: v["median_us"] for k_, v in a.items()}
        t16, tr, ma = t["fp16"], t.get("triton"), t.get("marlin")
        s_tr, s_ma = (f"{tr:.1f}" if tr else "-"), (f"{ma:.1f}" if ma else "-")
        r_tr, r_ma = (f"{t16 / tr:.2f}x" if tr else "-"), (f"{t16 / ma:.2f}x" if ma else "-")
        err = a["fp16"]["relerr_triton_vs_fp32_dequant"]
        out.append(f"| {shape:<11} | {m:>2} | {a['fp16']['group_size']:>3} | {t16:>8.1f} | {s_tr:>8} | {s_ma:>8} | "
                   f"{r_tr:>11} | {r_ma:>11} | {err:>7.1e} |")
    for (shape, m), a in by.items():
        if m == 1 and "triton" in a:
            r = a["fp16"]["median_us"] / a["triton"]["median_us"]
            out.append(f"TARGET gpu M=1 {shape}: triton vs fp16 {r:.2f}x (target >= {GPU_TARGET_VS_FP16}x) "
                       f"{verdict(r, GPU_TARGET_VS_FP16)}")
    return rows


# ---------------------------------------------------------------------------------------------- part 2: decode
def build_llama(layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model


def derived(model: torch.nn.Module, replace: dict[int, torch.nn.Parameter]) -> torch.nn.Module:
    """A copy of ``model`` that shares every parameter with it except those in ``replace`` (by ``id``),
    which it takes from there; only buffers are copied (page-faulting GBs of copies is slow on a VM)."""
    memo: dict[int, Any] = {id(p): replace.get(id(p), p) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def decode_rows(args: argparse.Namespace, meta: dict[str, Any], out: list[str]) -> list[dict[str, Any]]:
    from quantlab.nn.swap import iter_linears

    t0 = time.perf_counter()
    base = build_llama(args.layers)
    names = [n for n, _ in iter_linears(base, exclude=("lm_head",))]
    codes = {n: rtn_codes(base.get_submodule(n).weight.data, args.group_size) for n in names}
    models: dict[str, torch.nn.Module] = {"fp32": base}
    to16 = {id(p): torch.nn.Parameter(p.data.to(torch.bfloat16), requires_grad=False) for p in base.parameters()}
    models["bf16"] = derived(base, to16).to(torch.bfloat16)
    del to16
    for arm, src, dt in (("int4_fp32model", base, torch.float32), ("int4_bf16model", models["bf16"], torch.bfloat16)):
        # the dense Linear weights about to be packed are not copied: zero-stride placeholders of their shape
        skip = {id(src.get_submodule(n).weight): torch.nn.Parameter(
            torch.zeros((), dtype=dt).expand(*src.get_submodule(n).weight.shape), requires_grad=False) for n in names}
        m = derived(src, skip)
        pack_linears(m, codes, backend="cpu", scale_dtype=dt)
        models[arm] = m
    del codes, m  # lm_head, embeddings and norms are shared between fp32/int4_fp32model and bf16/int4_bf16model
    log.info("built 4 synthetic Llama models (%d layers, %d Linears packed) in %.1fs", args.layers, len(names),
             time.perf_counter() - t0)

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 32000, (1, args.prompt_len), generator=gen)
    attn = torch.ones_like(prompt)
    new = args.new_tokens

    def run(model: torch.nn.Module, n_tok: int) -> float:
        t = time.perf_counter()
        out_ids = model.generate(input_ids=prompt, attention_mask=attn, do_sample=False, max_new_tokens=n_tok,
                                 min_new_tokens=n_tok, pad_token_id=0, use_cache=True)
        dt = time.perf_counter() - t
        assert out_ids.shape[1] == prompt.shape[1] + n_tok, out_ids.shape
        return dt

    samples: dict[str, dict[str, list[float]]] = {a: {"one": [], "full": []} for a in models}
    first_tokens: dict[str, list[int]] = {}
    with torch.inference_mode():
        for a, model in models.items():  # warmup (also the tokens, for a sanity line)
            run(model, 1)
            ids = model.generate(input_ids=prompt, attention_mask=attn, do_sample=False, max_new_tokens=8,
                                 min_new_tokens=8, pad_token_id=0)
            first_tokens[a] = ids[0, prompt.shape[1]:].tolist()
        arms = list(models)
        for r in range(args.decode_repeats):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for a in order:
                samples[a]["one"].append(run(models[a], 1))
                samples[a]["full"].append(run(models[a], new + 1))
            log.info("decode repeat %d/%d done", r + 1, args.decode_repeats)
        # the dense lm_head GEMV alone (M=1), fp32 and bf16, for the 32-layer estimate
        head = base.lm_head.weight.data
        head16 = models["bf16"].lm_head.weight.data
        h32 = torch.randn(1, 4096)
        h16 = h32.to(torch.bfloat16)
        hres = bench_interleaved({"fp32": lambda: F.linear(h32, head), "bf16": lambda: F.linear(h16, head16)},
                                 budget_s=max(1.0, args.budget / 2), min_rounds=args.min_rounds)

    rows = []
    res: dict[str, dict[str, float]] = {}
    for a in models:
        one, full = statistics.median(samples[a]["one"]), statistics.median(samples[a]["full"])
        dec = full - one
        tok_s = new / dec if dec > 0 else float("nan")
        head_us = hres["bf16" if "bf16" in a else "fp32"]["median_us"]
        per_tok = dec / new
        est32 = head_us * 1e-6 + 32 * max(per_tok - head_us * 1e-6, 0.0) / args.layers
        res[a] = {"t_1tok_s": one, "t_full_s": full, "decode_tok_s": tok_s, "ms_per_token": 1e3 * per_tok,
                  "e2e_tok_s": (new + 1) / full, "lm_head_us": head_us, "est32_tok_s": 1.0 / est32}
        rows.append({"section": "decode", "device": "cpu", "arm": a, "layers": args.layers, "batch": 1,
                     "prompt_len": args.prompt_len, "new_tokens": new, "repeats": args.decode_repeats,
                     "median_us": 1e6 * per_tok, "n_iter": args.decode_repeats * new, **res[a],
                     "first_tokens": first_tokens[a], **meta})
    out.append("")
    out.append(f"Decode benchmark: synthetic Llama-7B-shaped, {args.layers} layers (random weights), batch 1, greedy, "
               f"prompt {args.prompt_len} tokens, {new} decode tokens, median of {args.decode_repeats} interleaved "
               "repeats (after 1 warmup)")
    out.append(f"  measured: decode tok/s = {new} / (median t(generate {new + 1} new) - median t(generate 1 new)), "
               "i.e. prefill and the first token excluded; e2e tok/s = (N+1) / t(generate N+1), prefill included")
    out.append("  int4 = RTN w4 g%d asym codes of every decoder Linear, PackedLinear backend 'cpu'; lm_head and "
               "embeddings dense in the model's dtype" % args.group_size)
    out.append(f"  est32 = estimate for 32 layers: t_lm_head + 32 * (t_token - t_lm_head) / {args.layers} (lm_head "
               "GEMV timed alone; attention/KV cost at this short context folded into per-layer time)")
    hdr = (f"| {'arm':<15} | {'ms/token':>9} | {'decode tok/s':>12} | {'e2e tok/s':>9} | {'t(1 tok) s':>10} | "
           f"{'lm_head ms':>10} | {'vs bf16':>8} | {'est32 tok/s':>11} | {'est32 vs bf16':>13} |")
    out.append(hdr)
    out.append("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    bf = res["bf16"]
    for a, r in res.items():
        out.append(f"| {a:<15} | {r['ms_per_token']:>9.1f} | {r['decode_tok_s']:>12.2f} | {r['e2e_tok_s']:>9.2f} | "
                   f"{r['t_1tok_s']:>10.3f} | {r['lm_head_us'] / 1e3:>10.2f} | "
                   f"{r['decode_tok_s'] / bf['decode_tok_s']:>7.2f}x | {r['est32_tok_s']:>11.3f} | "
                   f"{r['est32_tok_s'] / bf['est32_tok_s']:>12.2f}x |")
    same = sum(x == y for x, y in zip(first_tokens["int4_fp32model"], first_tokens["fp32"]))
    out.append(f"  sanity: first 8 greedy tokens int4_fp32model vs fp32 identical at {same}/8 positions (random "
               "weights: near-flat logits, so disagreement is not an error signal)")
    for a in ("int4_bf16model", "int4_fp32model"):
        r = res[a]["decode_tok_s"] / bf["decode_tok_s"]
        r32 = res[a]["est32_tok_s"] / bf["est32_tok_s"]
        out.append(f"TARGET decode {a} vs bf16: {r:.2f}x measured ({args.layers} layers) (target >= "
                   f"{DECODE_TARGET_VS_BF16}x) {verdict(r, DECODE_TARGET_VS_BF16)}; 32-layer estimate {r32:.2f}x "
                   f"{verdict(r32, DECODE_TARGET_VS_BF16)} (estimate)")
    return rows


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute: short time budgets, fewer decode repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's current)")
    ap.add_argument("--group-size", type=int, default=128, help="group size (Llama shapes, decode model)")
    ap.add_argument("--small-group-size", type=int, default=64,
                    help="group size for shapes whose K is not a multiple of --group-size (SmolLM2's 576)")
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per (shape, batch), all arms together (default 5, quick 0.7)")
    ap.add_argument("--min-rounds", type=int, default=None, help="minimum interleaved rounds (default 25, quick 5)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true", help="only the Llama-7B shapes")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic Llama (default 2, "
                    "quick 1)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 32, quick 16)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--decode-repeats", type=int, default=None, help="default 5, quick 3")
    ap.add_argument("--json", default=None, help="write every row (and the printed report) to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.budget is None:
        args.budget = 0.7 if args.quick else 5.0
    if args.min_rounds is None:
        args.min_rounds = 5 if args.quick else 25
    if args.new_tokens is None:
        args.new_tokens = 16 if args.quick else 32
    if args.layers is None:
        args.layers = 1 if args.quick else 2
    if args.decode_repeats is None:
        args.decode_repeats = 3 if args.quick else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = _dt.datetime.now().astimezone()
    meta = {"threads": threads, "torch": torch.__version__, "cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
            "date": started.isoformat(), "cpu_count": os.cpu_count()}
    t_start = time.perf_counter()
    out: list[str] = []
    out.append(f"bench_kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    out.append(f"date {started.isoformat(timespec='seconds')}  torch {torch.__version__}  threads {threads}  "
               f"cpu '{meta['cpu_model']}' ({os.cpu_count()} logical CPUs, {meta['cpu_capability']})  "
               f"loadavg at start {loadavg()}")
    out.append(f"budget {args.budget}s per (shape, batch), >= {args.min_rounds} interleaved rounds; "
               f"group size {args.group_size} ({args.small_group_size} where K % {args.group_size} != 0)")
    try:
        load1 = float(loadavg().split()[0])
    except ValueError:
        load1 = 0.0
    if threads > 1 and load1 + threads > (os.cpu_count() or 1) + 0.5:
        out.append(f"WARNING: {threads} threads on {os.cpu_count()} CPUs with load {load1:.1f}: OpenMP parallel regions "
                   "wait for a descheduled thread (seen here as a ~5-8 ms floor per call); consider --threads 1")
    shapes = LLAMA7B_SHAPES + ([] if args.skip_smollm2 else SMOLLM2_SHAPES)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        if not args.skip_kernels:
            rows += cpu_kernel_rows(shapes, args.batches, args, meta)
            print_cpu_table(rows, out)
            out.append("")
            if torch.cuda.is_available():
                rows += gpu_kernel_rows(shapes, args.batches, args, meta, out)
            else:
                out.append("GPU arms (fp16 F.linear vs PackedLinear backend 'triton'; vLLM Marlin) not run: "
                           "torch.cuda.is_available() is False (torch %s, no CUDA device on this machine)"
                           % torch.__version__)
                try:
                    import vllm  # noqa: F401
                    out.append("  vllm imports, but its Marlin op needs CUDA")
                except Exception:  # noqa: BLE001
                    out.append("  marlin: not run: vllm not installed")
    if not args.skip_decode:
        rows += decode_rows(args, meta, out)
    out.append("")
    out.append(f"total {time.perf_counter() - t_start:.0f}s; loadavg at end {loadavg()} "
               f"(other processes on the machine inflate absolute times; ratios of interleaved arms are steadier)")
    text = "\n".join(out)
    print(text)
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"args": vars(args), "meta": meta, "rows": rows, "report": text}, indent=1,
                                default=str) + "\n")
        log.info("wrote %s (%d rows)", p, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
