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

LANG_ORDER = ("python", "java", "go", "cpp", "avg")
_T1 = re.compile(r"^(?P<ev>[^/]+)/pass@1$")
_T2 = re.compile(r"^(?P<ev>[^/]+)/(?P<lang>python|java|go|cpp|avg)/pass@1$")


ROY_METHODS = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "fp16", "bf16", "fp32")
_T7 = re.compile(r"^(?P<ev>[^/]+)/tokens_per_s_(?P<end>min|max)$")
DAGGER = "\u2020"
CALIB_FOOTNOTE = (f"{DAGGER} calibrated on the evaluation set's own prompts (SmoothQuant+'s protocol): "
                  "not a held-out result")


def calibrated_on_eval(df: pd.DataFrame) -> pd.Series:
    """Boolean per row: the run was calibrated on an evaluation set's own items (False when unknown)."""
    if "calibrated_on_eval_set" not in df:
        return pd.Series(False, index=df.index)
    return df["calibrated_on_eval_set"].eq(True)


def mark_calibrated(labels: pd.Series, df: pd.DataFrame) -> pd.Series:
    """``labels`` with :data:`DAGGER` appended on the rows of runs calibrated on the evaluation set."""
    return labels.where(~calibrated_on_eval(df), labels.astype(str) + DAGGER)


def calib_footnotes(tab: pd.DataFrame) -> list[str]:
    """``[CALIB_FOOTNOTE]`` when a column name or a text cell of ``tab`` carries the dagger, else ``[]``."""
    cells = (v for c in tab.columns if not pd.api.types.is_numeric_dtype(tab[c]) for v in tab[c])
    if any(DAGGER in str(c) for c in tab.columns) or any(isinstance(v, str) and DAGGER in v for v in cells):
        return [CALIB_FOOTNOTE]
    return []


def method_labels(df: pd.DataFrame) -> pd.Series:
    """The run's method label (``rtn w4g64a``, ``bnb.nf4-dq``, ``fp32``; recorded since issue 5), else
    quantizer + format; ``†`` appended for runs calibrated on the evaluation set (see
    :func:`mark_calibrated`)."""
    fmt = df["format"].fillna("") if "format" in df else ""
    fallback = (df["quantizer"].fillna("?").astype(str) + " " + fmt.astype(str)).str.strip()
    if "method" not in df:
        return mark_calibrated(fallback, df)
    labels = df["method"].where(df["method"].notna() & (df["method"].astype(str) != ""), fallback).astype(str)
    return mark_calibrated(labels, df)


_method = method_labels


def _roy_order(methods) -> list[str]:
    methods = list(dict.fromkeys(methods))
    return [m for m in ROY_METHODS if m in methods] + sorted(m for m in methods if m not in ROY_METHODS)


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


SPREAD_NOTE = "cells over several seeds: mean ± sd (n=seeds)"


def with_spread(tab: pd.DataFrame, rows: pd.DataFrame, index: list[str], column: str | None,
                values: list[str]) -> pd.DataFrame:
    """Attach to ``tab`` (index columns + value columns) the sample sd and count of every cell pooled from
    more than one run of ``rows``; :func:`_as_text` shows them. ``column``: the pivoted column (its values
    name ``tab``'s columns), or None when ``values`` are ``tab``'s columns."""
    spread = {}
    keys = index + ([column] if column else [])
    for key, grp in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for v in values:
            vals = grp[v].dropna()
            if len(vals) > 1:
                col = key[-1] if column else v
                spread[(key[:len(index)], col)] = (float(vals.std(ddof=1)), len(vals))
    tab.attrs["spread"], tab.attrs["index"] = spread, index
    return tab


def table1(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per pass@1 metric without a language, method x model."""
    df = _ok(summary)
    out = []
    for col in [c for c in df.columns if _T1.match(str(c))]:
        sub = df[df[col].notna()]
        if sub.empty:
            continue
        sub = sub.assign(method=_method(sub))
        piv = sub.pivot_table(index="method", columns="model", values=col, aggfunc="mean")
        runs = sub.groupby("method").size().rename("runs")
        tab = with_spread(piv.join(runs).reset_index(), sub, ["method"], "model", [col])
        out.append((f"Table 1 shape: {col} (method x model)", tab))
    return out


def table2(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per multilingual eval and model, method x language pass@1."""
    df = _ok(summary)
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
            rows = rows.assign(method=_method(rows))
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
    df = _ok(summary)
    if col not in df or df[col].isna().all() or not any(_T7.match(str(c)) for c in df.columns):
        return []  # only next to a sampling study (every run records its footprint)
    sub = df[df[col].notna()].assign(method=lambda d: _method(d))
    piv = sub.pivot_table(index="model", columns="method", values=col, aggfunc="mean")
    piv = piv[_roy_order(piv.columns)].reset_index()
    piv.columns.name = None
    return [("Table 6 shape: memory footprint GB, 1e9 bytes (model x method)", piv)]


def table7(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: per sampling eval, model x method ``(min, max)`` tokens/s over the runs."""
    df = _ok(summary)
    evs = sorted({m["ev"] for c in df.columns if (m := _T7.match(str(c)))})
    out = []
    for ev in evs:
        lo, hi = f"{ev}/tokens_per_s_min", f"{ev}/tokens_per_s_max"
        if lo not in df or hi not in df:
            continue
        sub = df[df[lo].notna()].assign(method=lambda d: _method(d))
        if sub.empty:
            continue
        agg = sub.groupby(["model", "method"]).agg(lo=(lo, "min"), hi=(hi, "max")).reset_index()
        agg["cell"] = [f"({a:.2f}, {b:.2f})" for a, b in zip(agg["lo"], agg["hi"])]
        piv = agg.pivot(index="model", columns="method", values="cell")
        piv = piv[_roy_order(piv.columns)].fillna("-").reset_index()
        piv.columns.name = None
        out.append((f"Table 7 shape: {ev} tokens/s (min, max) over generation calls (model x method)", piv))
    return out


def _as_text(tab: pd.DataFrame) -> pd.DataFrame:
    """Scores as 4-decimal strings (``-`` where a method has no run for that column; ``mean ± sd (n=k)``
    where :func:`with_spread` found several runs)."""
    out = tab.copy()
    spread, index = tab.attrs.get("spread") or {}, tab.attrs.get("index") or []
    keys = list(zip(*(tab[i] for i in index))) if index else [()] * len(tab)
    for c in out.columns:
        if c not in ("method", "runs", "model") and pd.api.types.is_float_dtype(out[c]):
            cells = []
            for key, v in zip(keys, out[c]):
                sd_n = spread.get((tuple(key), c))
                text = "-" if pd.isna(v) else f"{float(v):.4f}"
                cells.append(f"{text} ± {sd_n[0]:.4f} (n={sd_n[1]})" if sd_n and not pd.isna(v) else text)
            out[c] = cells
    out.attrs = {}
    return out


def paper_tables(summary: pd.DataFrame, as_text: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """Every table shape the runs fill (none when no run has the metrics); ``as_text`` formats numbers."""
    from quantlab.tracking.llmqat_tables import llmqat_table1, llmqat_table2
    from quantlab.tracking.sampling_report import sampling_tables

    if summary.empty or "model" not in summary:
        return []
    tables = (table1(summary) + table2(summary) + table6(summary) + table7(summary) + sampling_tables(summary)
              + llmqat_table1(summary) + llmqat_table2(summary))
    return [(t, _as_text(tab)) for t, tab in tables] if as_text else tables
