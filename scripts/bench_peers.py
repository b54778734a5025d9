"""quantlab next to its peers, on the same model, the same calibration ids and the same scheme.

Every peer runs in its own venv, made on first use under ``~/.cache/quantlab/peers`` (torch pinned to
the build installed here, the peer's own pins for the rest; ``scripts/peers/envs.py``). Each pair runs
A B A B ... in fresh processes (peer, then quantlab, ``--reps`` times), each process measuring itself
with the same code (``scripts/peers/_measure.py``: wall time of the quantization call, RSS sampled
every 20 ms during it, weights first copied into private memory); each writes its dequantized weights,
and ONE evaluator (this process, quantlab's perplexity: non-overlapping 512-token windows of the
standard-library evaluation corpus, disjoint from the calibration corpus) scores them all, with a
paired bootstrap interval of the perplexity difference over windows.

Pairs (int4, group 64, asymmetric, lm_head and embeddings in full precision; 32 x 256 calibration
tokens of ``stdlib_calib``, random windows, seed 0, saved once as a .npy token file):

* ``gptq-llmcompressor``: llm-compressor GPTQModifier (actorder "static", one calibration pass per
  layer for all its Linears) vs quantlab gptq act_order + static_groups + true_sequential=false;
* ``awq-llmcompressor``: llm-compressor AWQModifier + QuantizationModifier vs quantlab awq with
  duo_scaling and no clip search (AWQModifier's algorithm);
* ``awq-llmcompressor-search2048``: the same peer vs quantlab's speed option ``search_tokens=2048``
  (eq. 4's loss over 8 of the 32 sequences; s_X still over all): a different algorithm setting, for
  the issue's "at equal perplexity" reading of the AWQ target (the table's Δppl says if it holds);
* ``gptq-gptqmodel``: GPTQModel 7.6.0 vs quantlab gptq with its settings;
* ``awq-autoawq``: AutoAWQ 0.2.9 vs quantlab awq with duo_scaling and the clip search (AutoAWQ's).

A peer that cannot be installed or run is reported as such in the table, never left out.

    python scripts/bench_peers.py                                # every pair, 2 repetitions
    python scripts/bench_peers.py --pairs gptq-llmcompressor --reps 3
    python scripts/bench_peers.py --table-from results/bench_peers.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts" / "peers"))

log = logging.getLogger("bench_peers")

PAIRS: dict[str, dict[str, Any]] = {
    "gptq-llmcompressor": {"env": "llmcompressor", "runner": "run_llmcompressor.py", "method": "gptq",
                           "ours": {"act_order": True, "static_groups": True, "true_sequential": False}},
    "awq-llmcompressor": {"env": "llmcompressor", "runner": "run_llmcompressor.py", "method": "awq",
                          "ours": {"duo_scaling": True, "clip": False}},
    "awq-llmcompressor-search2048": {"env": "llmcompressor", "runner": "run_llmcompressor.py", "method": "awq",
                                     "ours": {"duo_scaling": True, "clip": False, "search_tokens": 2048}},
    "gptq-gptqmodel": {"env": "gptqmodel", "runner": "run_gptqmodel.py", "method": "gptq",
                       "ours": {"act_order": True, "static_groups": True, "true_sequential": True}},
    "awq-autoawq": {"env": "autoawq", "runner": "run_autoawq.py", "method": "awq",
                    "ours": {"duo_scaling": True, "clip": True}},
}
TARGETS = {"gptq-llmcompressor": {"time": 0.6, "peak_rss": 1.0}, "awq-llmcompressor": {"time": 0.5},
           "awq-llmcompressor-search2048": {"time": 0.5}}
RUN_TIMEOUT_S = 4 * 3600


def make_token_file(workdir: Path, n: int, seqlen: int) -> tuple[Path, str]:
    """The calibration ids every arm uses: quantlab's stdlib_calib random windows, saved as .npy."""
    import numpy as np
    from transformers import AutoTokenizer

    from quantlab.calib.datasets import CalibConfig, build_calib
    from quantlab.models.smollm2 import ensure_smollm2
    from quantlab.utils.paths import cache_dir

    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2(cache_dir())))
    calib = build_calib(CalibConfig(source="local", path="stdlib_calib", sampling="random_windows",
                                    n_samples=n, seqlen=seqlen, seed=0), tok)
    path = workdir / f"calib_stdlib_{n}x{seqlen}_seed0.npy"
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(path, calib.tokens.numpy().astype("int64"))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def run_arm(python: Path, runner: str, out: Path, args: argparse.Namespace, model: Path, tokens: Path,
            method: str, settings: dict | None) -> dict[str, Any]:
    """One fresh process; its result.json, or ``{"status": "failed: ..."}``."""
    cmd = [str(python), str(REPO / "scripts" / "peers" / runner), "--model", str(model), "--tokens", str(tokens),
           "--method", method, "--group-size", str(args.group_size), "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if settings is not None:
        cmd += ["--settings", json.dumps(settings)]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "stderr.log", "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=RUN_TIMEOUT_S, cwd=out,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # cwd: llm-compressor writes logs/
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res_file = out / "result.json"
    if rc != 0 or not res_file.is_file():
        tail = (out / "stderr.log").read_text(errors="replace").strip().splitlines()[-3:]
        log.error("%s %s failed (%s): %s", runner, method, rc, " | ".join(tail))
        return {"status": f"failed (exit {rc}): {' | '.join(tail)[-400:]}", "wall_s": time.perf_counter() - t0}
    res = json.loads(res_file.read_text())
    res["status"] = "ok"
    return res


class Evaluator:
    """One perplexity evaluator for every arm: the base model, re-loaded with each arm's dense weights."""

    def __init__(self, model_dir: Path, windows: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from quantlab.evals.perplexity import PerplexityEval

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.ppl = PerplexityEval(name="stdlib", dataset="local", path="stdlib", seqlen=512, max_windows=windows)

    def score(self, weights: Path | None) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        from quantlab.types import RunContext

        self.model.load_state_dict(self.base)
        if weights is not None:
            sd = load_file(str(weights))
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
            if missing or unexpected:
                raise RuntimeError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=Path("."), tokenizer=self.tok)
        res = self.ppl.run(self.model, self.tok, ctx)
        windows = [res.per_item["ppl/stdlib"][str(i)] for i in range(len(res.per_item["ppl/stdlib"]))]
        return {"ppl": res.metrics["ppl/stdlib"], "windows": windows}


def summarize(pair: str, runs: list[dict[str, Any]], evals: dict[str, dict]) -> dict[str, Any]:
    """Means, spreads, paired ratios and the perplexity comparison of one pair."""
    from quantlab.metrics.paired import paired_bootstrap_ppl

    out: dict[str, Any] = {"pair": pair}
    for arm in ("peer", "ours"):
        ok = [r for r in runs if r["arm"] == arm and r["status"] == "ok"]
        failed = [r["status"] for r in runs if r["arm"] == arm and r["status"] != "ok"]
        out[arm] = {"n": len(ok), "failed": failed,
                    "quant_s": [round(r["quant_s"], 2) for r in ok],
                    "peak_rss_gib": [round(r["peak_rss_bytes"] / 2**30, 3) for r in ok],
                    "rss_increase_gib": [round((r["peak_rss_bytes"] - r["rss_start_bytes"]) / 2**30, 3) for r in ok],
                    "ppl": [evals[r["out"]]["ppl"] for r in ok if r["out"] in evals],
                    "settings": ok[0]["settings"] if ok else None, "versions": ok[0].get("versions") if ok else None}
    reps = sorted({r["rep"] for r in runs})
    paired = [(a, b) for rep in reps
              for a in [r for r in runs if r["rep"] == rep and r["arm"] == "peer" and r["status"] == "ok"]
              for b in [r for r in runs if r["rep"] == rep and r["arm"] == "ours" and r["status"] == "ok"]]
    if paired:
        out["time_ratio"] = [round(b["quant_s"] / a["quant_s"], 3) for a, b in paired]
        out["peak_rss_ratio"] = [round(b["peak_rss_bytes"] / a["peak_rss_bytes"], 3) for a, b in paired]
        a, b = evals.get(paired[0][0]["out"]), evals.get(paired[0][1]["out"])
        if a and b:
            cmp = paired_bootstrap_ppl([w[0] for w in a["windows"]], [w[1] for w in a["windows"]],
                                       [w[0] for w in b["windows"]], [w[1] for w in b["windows"]])
            out["ppl_diff"] = {"observed": cmp.diff.observed, "ci95": [cmp.diff.low, cmp.diff.high],
                               "n_windows": cmp.diff.n_items}
    return out


def _ms(xs: list[float], fmt: str = ".3g") -> str:
    """Up to 3 repetitions one by one (``83.4, 72``), more as mean ± sd; one value when all are equal."""
    if not xs:
        return "–"
    if len(set(xs)) == 1:
        return f"{xs[0]:{fmt}}"
    if len(xs) <= 3:
        return ", ".join(f"{x:{fmt}}" for x in xs)
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):.2g}"


def table(summary: dict[str, Any]) -> str:
    """The markdown table of a summary (``--table-from`` prints it again)."""
    head = ("| pair | tool | quant time s (per rep) | peak RSS GiB | RSS increase GiB | ppl | "
            "ours/peer time | ours/peer peak RSS | Δppl ours−peer [95% CI] |")
    lines = [head, "|" + "---|" * 9]
    for s in summary["pairs"]:
        if "unavailable" in s:
            lines.append(f"| {s['pair']} | {PAIRS[s['pair']]['env']} | not installable: {s['unavailable'][:120]} "
                         "| | | | | | |")
            continue
        for arm, tool in (("peer", PAIRS[s["pair"]]["env"]), ("ours", "quantlab")):
            a = s[arm]
            fail = f" ({len(a['failed'])} failed: {a['failed'][0][:80]})" if a["failed"] else ""
            ratio = ""
            if arm == "ours" and "time_ratio" in s:
                d = s.get("ppl_diff")
                ratio = (f" {_ms(s['time_ratio'])} | {_ms(s['peak_rss_ratio'])} | "
                         + (f"{d['observed']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "–") + " |")
            cells = [_ms(a["quant_s"], ".1f"), _ms(a["peak_rss_gib"], ".3f"), _ms(a["rss_increase_gib"], ".3f"),
                     _ms(a["ppl"], ".4f")]
            lines.append(f"| {s['pair']} | {tool}{fail} | " + " | ".join(cells) + " |" + (ratio or " | | |"))
    lines.append(f"\nfp (dequantized Q4_1) ppl: {summary['fp_ppl']:.4f}; {summary['provenance']}")
    for pair, t in TARGETS.items():
        s = next((x for x in summary["pairs"] if x["pair"] == pair and "time_ratio" in x), None)
        if s:
            for key, lim in t.items():
                v = max(s["time_ratio" if key == "time" else "peak_rss_ratio"])
                lines.append(f"target {pair} {key}: worst ratio {v:.3f} (<= {lim}: {'met' if v <= lim else 'MISSED'})")
            d = s.get("ppl_diff")
            if d:  # "at equal perplexity": quantlab not worse beyond the noise (the CI's lower end <= 0)
                lines.append(f"target {pair} perplexity: Δ {d['observed']:+.3f}, 95% CI low {d['ci95'][0]:+.3f} "
                             f"({'equal or better' if d['ci95'][0] <= 0 else 'WORSE'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list of {list(PAIRS)}")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every arm (default: torch's)")
    p.add_argument("--venvs", type=Path, default=None, help="peer venv root (default ~/.cache/quantlab/peers)")
    p.add_argument("--workdir", type=Path, default=REPO / "results" / "bench_peers_runs")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_peers.json")
    p.add_argument("--table-from", type=Path, help="print the table of a saved result and exit")
    args = p.parse_args(argv)
    args.workdir, args.out = args.workdir.resolve(), args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.table_from:
        sys.stdout.write(table(json.loads(args.table_from.read_text())) + "\n")
        return 0
    pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    bad = [x for x in pairs if x not in PAIRS]
    if bad:
        p.error(f"unknown pair(s) {bad}; choose from {list(PAIRS)}")
    import envs

    from quantlab.models.smollm2 import ensure_smollm2
    from quantlab.tracking.env import capture_env
    from quantlab.utils.paths import cache_dir

    model_dir = ensure_smollm2(cache_dir())
    tokens, sha = make_token_file(args.workdir, args.calib_samples, args.calib_seqlen)
    root = args.venvs or envs.DEFAULT_ROOT
    pythons: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    for key in dict.fromkeys(PAIRS[x]["env"] for x in pairs):
        try:
            pythons[key] = envs.venv_python(envs.ensure_venv(key, root))
        except envs.PeerUnavailable as exc:
            unavailable[key] = str(exc)
            log.error("peer %s is not installable: %s", key, exc)
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):  # A B A B: the peer, then quantlab, in fresh processes
        for pair in pairs:
            spec = PAIRS[pair]
            if spec["env"] in unavailable:
                continue
            for arm, python, runner, settings in (("peer", pythons[spec["env"]], spec["runner"], None),
                                                  ("ours", Path(sys.executable), "run_quantlab.py", spec["ours"])):
                out = args.workdir / pair / f"{arm}-{rep}"
                log.info("rep %d %s %s", rep, pair, arm)
                res = run_arm(python, runner, out, args, model_dir, tokens, spec["method"], settings)
                runs.append({**res, "pair": pair, "arm": arm, "rep": rep, "out": str(out)})
    ev = Evaluator(model_dir, args.ppl_windows)
    evals = {r["out"]: ev.score(Path(r["weights"])) for r in runs if r["status"] == "ok"}
    fp = ev.score(None)
    summary = {
        "pairs": [{"pair": x, "unavailable": unavailable[PAIRS[x]["env"]]} if PAIRS[x]["env"] in unavailable
                  else summarize(x, [r for r in runs if r["pair"] == x], evals) for x in pairs],
        "fp_ppl": fp["ppl"], "runs": runs, "token_file": str(tokens), "token_sha256": sha,
        "provenance": (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs; SmolLM2-135M-Instruct (dequantized Q4_1) fp32; "
                       f"{args.calib_samples}x{args.calib_seqlen} stdlib_calib tokens (sha256 {sha[:12]}); "
                       f"w4 g{args.group_size} asym; ppl stdlib {args.ppl_windows}x512; {args.reps} reps A B A B"),
        "env": capture_env("cpu"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    sys.stdout.write(table(summary) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
