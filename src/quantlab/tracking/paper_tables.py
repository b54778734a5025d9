"""Code-benchmark tables in the SmoothQuant+ paper's shapes, built from whatever runs are present.

* Table 1 shape: HumanEval pass@1, one row per method (quantizer + format), one column per model.
* Table 2 shape: BabelCode pass@1, one row per method, one column per language (Python, Java, Go,
  C++) and their average; one table per model.

Cells average the successful runs of that method and model (seeds); the cell count is in ``runs``.
Only ``status == ok`` rows count: a failed run never fills a cell.
"""
from __future__ import annotations

import re

import pandas as pd

LANG_ORDER = ("python", "java", "go", "cpp", "avg")
_T1 = re.compile(r"^(?P<ev>[^/]+)/pass@1$")
_T2 = re.compile(r"^(?P<ev>[^/]+)/(?P<lang>python|java|go|cpp|avg)/pass@1$")


def _method(df: pd.DataFrame) -> pd.Series:
    fmt = df["format"].fillna("") if "format" in df else ""
    return (df["quantizer"].fillna("?").astype(str) + " " + fmt.astype(str)).str.strip()


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


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
        out.append((f"Table 1 shape: {col} (method x model)", piv.join(runs).reset_index()))
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
            tab.columns = [c.split("/")[1] for c in cols]
            tab["runs"] = rows.groupby("method").size()
            out.append((f"Table 2 shape: {ev} pass@1 on {model} (method x language)", tab.reset_index()))
    return out


def _as_text(tab: pd.DataFrame) -> pd.DataFrame:
    """Scores as 4-decimal strings (``-`` where a method has no run for that column)."""
    out = tab.copy()
    for c in out.columns:
        if c not in ("method", "runs"):
            out[c] = out[c].map(lambda v: "-" if pd.isna(v) else f"{float(v):.4f}")
    return out


def paper_tables(summary: pd.DataFrame, as_text: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """Both table shapes (empty when no run has code metrics); ``as_text`` formats the scores."""
    if summary.empty or "model" not in summary:
        return []
    tables = table1(summary) + table2(summary)
    return [(t, _as_text(tab)) for t, tab in tables] if as_text else tables
