"""Sampling-hyperparameter sweep (Roy 2023, the PTQ sampling study): generate every prompt under every
(temperature, top_k, max_new_tokens) of a grid with a bare top-k sampler and score the duplicate
content words of each continuation.

* Decoding: temperature then top-k (transformers' warpers), ``top_p = 1``, no repetition penalty,
  nothing inherited from the model's ``generation_config``; one generation per prompt and cell.
* Plan and seeds: :mod:`quantlab.evals.sampling.grid` (nested budgets by default; ``nested=false``
  is the paper's one-call-per-combination protocol with identical texts).
* Resumable: each finished generation call is one line of ``calls.jsonl`` in a store keyed by the run
  fingerprint (model, method, calibration, seed, quantlab source) and the settings that determine the
  texts; a killed run loses at most the call in flight, and a rerun of the same command generates only
  what is missing. Stored calls are reused by any grid that needs them (a Hydra multirun over
  ``eval.sampling.temperature=...`` and the full grid share one store).
* Output in the run dir: ``<name>_generations.jsonl`` (every generation with its counts), tables
  ``<name>_cells`` (per grid cell), ``<name>_calls`` (timing per call) and the by-temperature /
  by-max-returned-tokens / by-top_k aggregates, and PNG plots of duplicate content words against each.
* Speed: tokens/s of every generation call = generated tokens / wall time of the call (all prompts of
  the cell decode together, up to ``batch_size`` at once); Table 7 reports its min and max.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from quantlab.errors import ConfigError
from quantlab.evals.base import Evaluator, register_evaluator
from quantlab.evals.sampling.analysis import PLOTS, aggregate, plot_duplicates
from quantlab.evals.sampling.grid import (
    PAPER_MAX_NEW_TOKENS,
    PAPER_TEMPERATURES,
    PAPER_TOP_KS,
    Call,
    SamplingGrid,
    cell_seed,
)
from quantlab.evals.sampling.prompts import SweepPrompt, load_prompts, prompts_sha256
from quantlab.generation import DecodingConfig, GenRequest, generate
from quantlab.metrics.duplicates import definition, duplicate_content_words
from quantlab.types import EvalResult, RunContext
from quantlab.utils.checks import is_int
from quantlab.utils.hashing import fingerprint
from quantlab.utils.jsonl import append_jsonl, read_jsonl
from quantlab.utils.paths import results_root

log = logging.getLogger(__name__)

CALLS = "calls.jsonl"


@register_evaluator("sampling_sweep")
@dataclass(frozen=True)
class SamplingSweep(Evaluator):
    """Sampling sweep settings.

    Attributes:
        prompts: ``roy2023`` (the paper's ten prompts) or a ``.txt``/``.jsonl`` file.
        temperatures, top_ks, max_new_tokens: the grid (default: the paper's 9 x 7 x 10).
        temperature, top_k: when set, restrict the grid to that one value (for a Hydra multirun:
            ``-m eval.sampling.temperature=0.1,0.5,1.0``).
        nested: one call per (temperature, top_k) cut to every budget (default), or one call per
            combination (the paper's protocol; same texts, per-budget tokens/s).
        seed: base seed of the cell seeds.
        batch_size: sequences decoded together (1 = one prompt at a time, the paper's setting).
        backend: generation backend (``hf``, ``vllm``, ``auto``).
        tensor_parallel_size: vLLM's GPUs per model (:class:`~quantlab.generation.config.DecodingConfig`).
        min_len: shortest content word (duplicate metric definition).
        resume: reuse generation calls stored by an earlier run of the same model and settings.
        plots: write the PNG plots.
    """

    prompts: str = "roy2023"
    temperatures: tuple[float, ...] = PAPER_TEMPERATURES
    top_ks: tuple[int, ...] = PAPER_TOP_KS
    max_new_tokens: tuple[int, ...] = PAPER_MAX_NEW_TOKENS
    temperature: float | None = None
    top_k: int | None = None
    nested: bool = True
    seed: int = 0
    batch_size: int = 16
    backend: str = "hf"
    tensor_parallel_size: int | str = 1
    min_len: int = 2
    resume: bool = True
    plots: bool = True
    execution_fields: ClassVar[tuple[str, ...]] = ("resume", "plots")
    neutral_settings: ClassVar[dict[str, Any]] = {"tensor_parallel_size": 1}  # added 2026-12
    slice_fields: ClassVar[tuple[str, ...]] = ("temperature", "top_k")  # one job per grid slice

    def __post_init__(self) -> None:
        key = f"eval.{self.name or 'sampling'}"
        self.grid(key)  # validates the lists
        DecodingConfig(do_sample=True, batch_size=self.batch_size, backend=self.backend, seed=self.seed, key=key,
                       tensor_parallel_size=self.tensor_parallel_size)
        if not is_int(self.min_len) or self.min_len < 1:
            raise ConfigError(f"{key}.min_len", f"must be an integer >= 1, got {self.min_len!r}")

    def grid(self, key: str | None = None) -> SamplingGrid:
        key = key or f"eval.{self.name}"
        temps = self.temperatures if self.temperature is None else (self.temperature,)
        ks = self.top_ks if self.top_k is None else (self.top_k,)
        return SamplingGrid.build(temps, ks, self.max_new_tokens, self.nested, key)

    def preflight(self) -> None:
        load_prompts(self.prompts, f"eval.{self.name}.prompts")

    # --- generation --------------------------------------------------------------------------------
    def _store_dir(self, ctx: RunContext, meta: dict[str, Any]) -> Path:
        if self.resume and ctx.run_fingerprint:
            key = fingerprint({"run": ctx.run_fingerprint, **meta})
            return results_root() / "cache" / "sampling" / f"{self.name}-{key[:20]}"
        return ctx.output_dir / f"{self.name}_store"

    def _decoding(self, call: Call) -> DecodingConfig:
        return DecodingConfig(do_sample=True, temperature=call.temperature, top_k=call.top_k, top_p=1.0,
                              max_new_tokens=call.budget, seed=cell_seed(self.seed, call.temperature, call.top_k),
                              batch_size=self.batch_size, backend=self.backend, key=f"eval.{self.name}",
                              tensor_parallel_size=self.tensor_parallel_size)

    def _stored_calls(self, path: Path, n_prompts: int) -> dict[str, dict[str, Any]]:
        """Complete stored calls by key (a later line for the same key wins)."""
        out = {}
        for row in read_jsonl(path):
            if len(row.get("generations", ())) == n_prompts and "call" in row:
                out[row["call"]["key"]] = row
        return out

    def _find(self, stored: dict[str, dict[str, Any]], call: Call) -> dict[str, Any] | None:
        if call.key in stored:
            return stored[call.key]
        if self.nested:  # any longer generation of the same cell holds this one (same seeds)
            longer = [r for r in stored.values() if r["call"]["temperature"] == call.temperature
                      and r["call"]["top_k"] == call.top_k and r["call"]["budget"] >= call.budget]
            if longer:
                return min(longer, key=lambda r: r["call"]["budget"])
        return None

    def _generate(self, model: nn.Module, tokenizer: Any, prompts: list[SweepPrompt], calls: list[Call],
                  store: Path) -> tuple[list[tuple[Call, dict[str, Any]]], int]:
        store.mkdir(parents=True, exist_ok=True)
        stored = self._stored_calls(store / CALLS, len(prompts))
        requests = [GenRequest(p.text) for p in prompts]
        done, reused = [], 0
        for i, call in enumerate(calls):
            row = self._find(stored, call)
            if row is not None:
                done.append((call, {**row, "call": {**row["call"], "resumed": True}}))
                reused += 1
                continue
            dec = self._decoding(call)
            t0 = time.perf_counter()
            comps, stats = generate(model, tokenizer, requests, dec)
            wall = time.perf_counter() - t0
            row = {
                "call": {"key": call.key, "temperature": call.temperature, "top_k": call.top_k,
                         "budget": call.budget, "seed": dec.seed, "batch_size": self.batch_size,
                         "backend": stats.backend, "n_prompts": len(prompts),
                         "generated_tokens": stats.generated_tokens, "wall_s": wall,
                         "tokens_per_s": stats.generated_tokens / wall if wall > 0 else 0.0},
                "generations": [{"prompt_id": p.id, "token_ids": list(c[0].token_ids), "n_tokens": c[0].n_tokens,
                                 "finish_reason": c[0].finish_reason} for p, c in zip(prompts, comps)],
            }
            append_jsonl(store / CALLS, [row])
            done.append((call, {**row, "call": {**row["call"], "resumed": False}}))
            log.info("sampling call %d/%d %s: %.1f tokens/s", i + 1, len(calls), call.key, row["call"]["tokens_per_s"])
        return done, reused

    # --- scoring -----------------------------------------------------------------------------------
    def _rows(self, tokenizer: Any, prompts: list[SweepPrompt], done: list[tuple[Call, dict[str, Any]]]):
        prompt_len = {p.id: len(tokenizer(p.text)["input_ids"]) for p in prompts}
        text = {p.id: p.text for p in prompts}
        rows = []
        for call, row in done:
            c = row["call"]
            for g in row["generations"]:
                for budget in call.serves:
                    ids = g["token_ids"][:budget]
                    cont = tokenizer.decode(ids, skip_special_tokens=True)
                    stats = duplicate_content_words(cont, min_len=self.min_len)
                    rows.append({
                        "prompt_id": g["prompt_id"], "prompt": text[g["prompt_id"]],
                        "temperature": call.temperature, "top_k": call.top_k, "max_new_tokens": budget,
                        "prompt_tokens": prompt_len[g["prompt_id"]],
                        "max_returned_tokens": prompt_len[g["prompt_id"]] + budget,
                        "n_new_tokens": len(ids),
                        "finish_reason": g["finish_reason"] if g["n_tokens"] <= budget else "length",
                        **stats.to_dict(), "seed": c["seed"], "call": c["key"], "text": cont,
                    })
        rows.sort(key=lambda r: (r["temperature"], r["top_k"], r["max_new_tokens"], r["prompt_id"]))
        return rows

    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        grid = self.grid()
        prompts = load_prompts(self.prompts, f"eval.{self.name}.prompts")
        meta = {"prompts_sha256": prompts_sha256(prompts), "seed": self.seed, "batch_size": self.batch_size,
                "backend": self.backend, "decoder": "temperature -> top-k, top_p=1, no repetition penalty"}
        store = self._store_dir(ctx, meta)
        calls = grid.calls()
        done, reused = self._generate(model, tokenizer, prompts, calls, store)
        rows = self._rows(tokenizer, prompts, done)
        export = ctx.output_dir / f"{self.name}_generations.jsonl"
        export.unlink(missing_ok=True)
        append_jsonl(export, rows)

        import pandas as pd

        df = pd.DataFrame(rows)
        call_rows = [r["call"] for _, r in done]
        speeds = [c["tokens_per_s"] for c in call_rows]
        n = self.name
        metrics = {
            f"{n}/dup_words_mean": float(df["duplicates"].mean()),
            f"{n}/content_words_mean": float(df["n_content"].mean()),
            f"{n}/dup_ratio_mean": float(df["duplicate_ratio"].mean()),
            f"{n}/dup_words_total": float(df["duplicates"].sum()),
            f"{n}/content_words_total": float(df["n_content"].sum()),
            f"{n}/n_generations": float(len(df)),
            f"{n}/tokens_per_s_min": float(min(speeds)),
            f"{n}/tokens_per_s_max": float(max(speeds)),
        }
        prov = {
            "protocol": "roy2023_sampling_sweep" if self.prompts == "roy2023" else "sampling_sweep",
            "prompts": self.prompts, "n_prompts": len(prompts), **meta,
            "grid": {"temperatures": list(grid.temperatures), "top_ks": list(grid.top_ks),
                     "max_new_tokens": list(grid.max_new_tokens)},
            "nested": grid.nested, "n_calls": len(calls), "calls_reused": reused, "store": str(store),
            "seeding": "cell_seed(seed, temperature, top_k), per prompt sample_seed(cell seed, prompt, 0)",
            "metric_definition": definition(self.min_len),
            "tokens_per_s": "generated tokens / wall time of one generation call (all prompts of a cell, "
                            f"batch_size={self.batch_size}); min and max over calls, resumed ones included",
        }
        tables = {f"{n}_cells": aggregate(df, ["temperature", "top_k", "max_new_tokens"]), f"{n}_calls": call_rows}
        for by in PLOTS:
            tables[f"{n}_by_{by}"] = aggregate(df, [by])
        images = {}
        if self.plots:
            label = ctx.method_label or "model"
            for by in PLOTS:
                path = ctx.output_dir / f"{n}_dup_vs_{by}.png"
                plot_duplicates(df.assign(method=label), by, path)
                images[f"{n}_dup_vs_{by}"] = path
        return EvalResult(metrics=metrics, provenance={k: dict(prov) for k in metrics}, tables=tables, images=images)
