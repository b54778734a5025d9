"""Tables in the papers' shapes, built from whatever runs are present.

* Table 1 shape (SmoothQuant+): HumanEval pass@1, one row per method, one column per model.
* Table 2 shape (SmoothQuant+): BabelCode pass@1, one row per method, one column per language
  (Python, Java, Go, C++) and their average; one table per model.
* Table 6 shape (Roy's PTQ study): memory footprint in GB (1e9 bytes), one row per model, one column
  per method (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8, fp16 first, then any other).
* Table 7 shape (same study): (min, max) tokens/s of the sampling sweep's generation calls.
* Sampling tables (same study, section 4): :mod:`quantlab.tracking.sampling_report`.
* LLM-QAT Tables 1-2 shapes (zero-shot, perplexity by W-A-KV): :mod:`quantlab.tracking.llmqat_tables`.

Cells average the successful runs of that method and model, which the report has reduced to one run per
variant and seed (:mod:`quantlab.tracking.runset`), so a cell's runs are seeds of one variant: with more
than one the text cell reads ``mean ± sd (n=k)`` (sample standard deviation); ``runs`` counts the method's
runs. Only ``status == ok`` rows count: a failed run never fills a cell. A run calibrated on the evaluation
set's own prompts (flat column ``calibrated_on_eval_set``) is labelled ``<method>†`` (so it never shares a
row with held-out runs of the method) and its tables carry :data:`CALIB_FOOTNOTE`.
"""
from __future__ import annotations

import re

import pandas as pd

from quantlab.tracking.cells import CALIB_FOOTNOTE, method_labels, ok_rows, roy_order, with_spread
from quantlab.tracking.cells import as_text as text_cells
from quantlab.tracking.llmqat_tables import llmqat_table1, llmqat_table2
from quantlab.tracking.sampling_report import sampling_tables

LANG_ORDER = ("python", "java", "go", "cpp", "avg")
_T1 = re.compile(r"^(?P<ev>[^/]+)/pass@1$")
_T2 = re.compile(r"^(?P<ev>[^/]+)/(?P<lang>python|java|go|cpp|avg)/pass@1$")
_T7 = re.compile(r"^(?P<ev>[^/]+)/tokens_per_s_(?P<end>min|max)$")


def table1(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per pass@1 metric without a language, method x model."""
    df = ok_rows(summary)
    out = []
    for col in [c for c in df.columns if _T1.match(str(c))]:
        sub = df[df[col].notna()]
        if sub.empty:
            continue
        sub = sub.assign(method=method_labels(sub))
        piv = sub.pivot_table(index="method", columns="model", values=col, aggfunc="mean")
        runs = sub.groupby("method").size().rename("runs")
        tab = with_spread(piv.join(runs).reset_index(), sub, ["method"], "model", [col])
        out.append((f"Table 1 shape: {col} (method x model)", tab))
    return out


def table2(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per multilingual eval and model, method x language pass@1."""
    df = ok_rows(summary)
    by_ev: dict[str, dict[str, str]] = {}
    for c in df.columns:
        m = _T2.match(str(c))
        if m:
            by_ev.setdefault(m["ev"], {})[m["lang"]] = c
    out = []
    for ev, langs in by_ev.items():
        cols = [langs[x] for x in LANG_ORDER if x in langs]
        sub = df[df[cols].notna().any(axis=1)]
        for model, rows in sub.groupby("model", sort=True):
            rows = rows.assign(method=method_labels(rows))
            tab = rows.groupby("method")[cols].mean()
            tab["runs"] = rows.groupby("method").size()
            tab = with_spread(tab.reset_index(), rows, ["method"], None, cols)
            tab.attrs["spread"] = {(k, c.split("/")[1]): v for (k, c), v in tab.attrs["spread"].items()}
            tab.columns = [c.split("/")[1] if c in cols else c for c in tab.columns]
            out.append((f"Table 2 shape: {ev} pass@1 on {model} (method x language)", tab))
    return out


def table6(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: model x method memory footprint (GB) of every run that recorded one."""
    col = "memory/footprint_gb"
    df = ok_rows(summary)
    if col not in df or df[col].isna().all() or not any(_T7.match(str(c)) for c in df.columns):
        return []  # only next to a sampling study (every run records its footprint)
    sub = df[df[col].notna()].assign(method=lambda d: method_labels(d))
    piv = sub.pivot_table(index="model", columns="method", values=col, aggfunc="mean")
    piv = piv[roy_order(piv.columns)].reset_index()
    piv.columns.name = None
    return [("Table 6 shape: memory footprint GB, 1e9 bytes (model x method)", piv)]


def table7(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per sampling eval, model x method ``(min, max)`` tokens/s over the runs."""
    df = ok_rows(summary)
    evs = sorted({m["ev"] for c in df.columns if (m := _T7.match(str(c)))})
    out = []
    for ev in evs:
        lo, hi = f"{ev}/tokens_per_s_min", f"{ev}/tokens_per_s_max"
        if lo not in df or hi not in df:
            continue
        sub = df[df[lo].notna()].assign(method=lambda d: method_labels(d))
        if sub.empty:
            continue
        agg = sub.groupby(["model", "method"]).agg(lo=(lo, "min"), hi=(hi, "max")).reset_index()
        agg["cell"] = [f"({a:.2f}, {b:.2f})" for a, b in zip(agg["lo"], agg["hi"])]
        piv = agg.pivot(index="model", columns="method", values="cell")
        piv = piv[roy_order(piv.columns)].fillna("-").reset_index()
        piv.columns.name = None
        out.append((f"Table 7 shape: {ev} tokens/s (min, max) over generation calls (model x method)", piv))
    return out


__all__ = ["CALIB_FOOTNOTE", "paper_tables", "table1", "table2", "table6", "table7"]


def paper_tables(summary: pd.DataFrame, as_text: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """Every table shape the runs fill (none when no run has the metrics); ``as_text`` formats numbers."""
    if summary.empty or "model" not in summary:
        return []
    tables = (table1(summary) + table2(summary) + table6(summary) + table7(summary) + sampling_tables(summary)
              + llmqat_table1(summary) + llmqat_table2(summary))
    return [(t, text_cells(tab)) for t, tab in tables] if as_text else tables
