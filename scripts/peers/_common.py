"""CLI and bookkeeping shared by the peer runners (run_*.py).

Runs inside a peer venv: stdlib + torch + the modules beside this file only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure

log = logging.getLogger("quantlab.peers.runner")


def parse_args(methods: tuple[str, ...], argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path, help="HF Llama folder")
    ap.add_argument("--tokens", required=True, type=Path, help=".npy/.pt int64 [n, seqlen]")
    ap.add_argument("--method", required=True, choices=methods)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.bits != 4:
        ap.error("only int4 is wired (the benchmark scheme)")
    return args


def setup(args: argparse.Namespace) -> torch.Tensor:
    """Logging, threads, offline hub; returns the calibration ids [n, seqlen]."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = _measure.load_tokens(args.tokens)
    log.info("calibration ids %s from %s, torch threads %d", tuple(ids.shape), args.tokens,
             torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    return ids


def check_uses_ids(seen: list[torch.Tensor], ids: torch.Tensor, what: str) -> dict[str, Any]:
    """Compare the sequences a library actually fed the model with the given ids.

    ``seen`` are input_ids tensors captured at the model's embedding (any batch
    shape).  Returns a report dict; raises if the multiset of rows differs.
    """
    rows = [tuple(r.tolist()) for t in seen for r in t.reshape(-1, t.shape[-1]).cpu()]
    want = [tuple(r.tolist()) for r in ids]
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[r] = counts.get(r, 0) + 1
    first_seen = list(dict.fromkeys(rows))
    same_set = sorted(first_seen) == sorted(want) and len(set(want)) == len(want)
    rep = {"embedding_calls_rows": len(rows), "unique_rows_seen": len(first_seen),
           "row_len_seen": len(rows[0]) if rows else 0,
           "passes_per_row": sorted(set(counts.values())),
           "same_rows_as_token_file": same_set, "same_order_as_token_file": first_seen == want}
    log.info("%s calibration check: %s", what, rep)
    if not same_set:
        raise RuntimeError(f"{what} did not calibrate on exactly the given token rows: {rep}")
    return rep


class EmbeddingInputRecorder:
    """Records every input_ids tensor that reaches an nn.Embedding (forward pre-hook)."""

    def __init__(self, embedding: torch.nn.Module):
        self.seen: list[torch.Tensor] = []
        self._h = embedding.register_forward_pre_hook(self._hook)

    def _hook(self, _mod: torch.nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            self.seen.append(inputs[0].detach().cpu().clone())

    def remove(self) -> None:
        self._h.remove()


@torch.no_grad()
def forward_matches(mod: torch.nn.Module, w_dense: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> float | str:
    """Max relative error between a packed quant module's own forward and x @ W_dense.T
    (a string with the error when the module's forward cannot run here, e.g. GPU-only kernel)."""
    try:
        return _forward_err(mod, w_dense, bias, dtype)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return f"forward not runnable: {type(exc).__name__}: {str(exc)[:200]}"


def _forward_err(mod, w_dense, bias, dtype) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, w_dense.shape[1], generator=gen).to(dtype)
    y = mod(x).float()
    ref = x.float() @ w_dense.float().T + (bias.float() if bias is not None else 0)
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def finish(args: argparse.Namespace, ids: torch.Tensor, sampler: "_measure.RssSampler",
           rss_after_load: int, dense: dict[str, torch.Tensor] | Callable[[], dict],
           settings: dict[str, Any], peer_dist: str, extra: dict[str, Any] | None = None,
           tied: bool | None = None) -> dict[str, Any]:
    """Write weights.safetensors + result.json; return the result dict."""
    sd = dense() if callable(dense) else dense
    written = _measure.save_dense(sd, args.out / "weights.safetensors", tied=tied)
    result = {
        "peer": peer_dist,
        "method": args.method,
        "quant_s": sampler.elapsed_s,
        "quant_cpu_s": sampler.cpu_s,
        "minor_faults": sampler.minor_faults,
        "peak_rss_bytes": sampler.peak,
        "rss_start_bytes": sampler.start,
        "rss_after_load_bytes": rss_after_load,
        "rss_end_bytes": sampler.end,
        "n_samples": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "threads": torch.get_num_threads(),
        "versions": _measure.versions(peer_dist),
        "settings": settings,
        "n_tensors": len(written),
        "weights": str(args.out / "weights.safetensors"),
        **(extra or {}),
    }
    _measure.emit(result, args.out)
    return result
