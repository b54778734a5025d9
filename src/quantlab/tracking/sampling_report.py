"""Cross-run tables and plots of sampling sweeps (Roy 2023, section 4): methods side by side.

Every successful run with a sampling evaluator ``<ev>`` wrote ``<ev>_cells.json`` (one row per
(temperature, top_k, max_new_tokens) cell: generation count and means) in its run dir. Runs of the
same experiment, model and method are pooled (a Hydra multirun over ``eval.<ev>.temperature`` gives
one run per temperature; a cell present twice counts once, from the latest run). Per (experiment,
model, eval):

* a method summary: generations, mean content words, mean duplicate content words, duplicates per
  100 content words;
* method x temperature, method x max returned tokens (by max_new_tokens), method x top_k tables of
  the mean duplicate content words per generation;
* the same three as PNG line plots (:func:`sampling_plots`, written by ``python -m quantlab.report``).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from quantlab.evals.sampling.analysis import PLOTS, combine_cells, plot_duplicates
from quantlab.tracking.cells import method_labels, roy_order

log = logging.getLogger(__name__)

_EV = re.compile(r"^(?P<ev>[^/]+)/n_generations$")
_CELL = ["temperature", "top_k", "max_new_tokens"]


def _cells(run_dir: str, ev: str) -> pd.DataFrame | None:
    path = Path(run_dir) / f"{ev}_cells.json"
    try:
        return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        log.warning("sampling cells of %s unreadable (%s); run left out of the sampling tables", run_dir, e)
        return None


def study_groups(summary: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, pd.DataFrame]]:
    """``(experiment, model, eval) -> {method: pooled cell frame}`` for the successful sweep runs."""
    if summary.empty or "output_dir" not in summary:
        return {}
    ok = summary[summary["status"] == "ok"] if "status" in summary else summary
    evs = sorted({m["ev"] for c in ok.columns if (m := _EV.match(str(c)))})
    out: dict[tuple[str, str, str], dict[str, pd.DataFrame]] = {}
    for ev in evs:
        runs = ok[ok[f"{ev}/n_generations"].notna()]
        runs = runs.assign(_method=method_labels(runs)).sort_values("started_at" if "started_at" in runs else "run_id")
        for (exp, model, method), group in runs.groupby(["experiment", "model", "_method"], sort=False):
            frames = [f for f in (_cells(d, ev) for d in group["output_dir"]) if f is not None and not f.empty]
            if not frames:
                continue
            cells = pd.concat(frames, ignore_index=True).drop_duplicates(_CELL, keep="last")
            out.setdefault((str(exp), str(model), ev), {})[str(method)] = cells
    return out


def _summary(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for method, cells in frames.items():
        n = cells["n"].sum()
        content = (cells["content_words_mean"] * cells["n"]).sum()
        dups = (cells["dup_words_mean"] * cells["n"]).sum()
        rows.append({"method": method, "generations": int(n), "content_words_mean": content / n,
                     "dup_words_mean": dups / n, "dup_per_100_content": 100 * dups / content if content else 0.0})
    tab = pd.DataFrame(rows).set_index("method")
    return tab.loc[roy_order(tab.index)].reset_index()


def sampling_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Method summary and method x (temperature | max_new_tokens | top_k) duplicate-word tables."""
    out = []
    for (exp, model, ev), frames in study_groups(summary).items():
        where = f"{exp} / {model} / {ev}"
        out.append((f"Sampling study {where}: generations and content words per method", _summary(frames)))
        for by in PLOTS:
            comb = combine_cells(frames, by)
            piv = comb.pivot(index="method", columns=by, values="dup_words_mean")
            piv = piv.loc[roy_order(piv.index)]
            piv.columns = [f"{by}={c:g}" for c in piv.columns]
            out.append((f"Sampling study {where}: duplicate content words per generation, method x {by}",
                        piv.reset_index()))
    return out


def sampling_plots(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The three paper-style plots per (experiment, model, eval), one line per method, under ``out_dir``."""
    paths = []
    for (exp, model, ev), frames in study_groups(summary).items():
        for by in PLOTS:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{exp}_{model}_{ev}_dup_vs_{by}")
            path = Path(out_dir) / f"{stem}.png"
            axis = "max returned tokens" if by == "max_new_tokens" else by
            plot_duplicates(combine_cells(frames, by), by, path, title=f"{model}: duplicate content words vs {axis}")
            paths.append(path)
    return paths
