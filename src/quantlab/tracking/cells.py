"""The cells every report table shares: method labels (with the test-set-calibration dagger), Roy's
method order, the rows that count (``status == ok``) and the ``mean ± sd (n=k)`` text of pooled cells.

Used by the paper-shaped tables (:mod:`quantlab.tracking.paper_tables`, :mod:`~quantlab.tracking.llmqat_tables`,
:mod:`~quantlab.tracking.sampling_report`) and the paired comparisons (:mod:`~quantlab.tracking.paired_table`).
"""
from __future__ import annotations

import pandas as pd

ROY_METHODS = ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "fp16", "bf16", "fp32")
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
    fmt = df["format"].fillna("") if "format" in df else pd.Series("", index=df.index)
    fallback = (df["quantizer"].fillna("?").astype(str) + " " + fmt.astype(str)).str.strip()
    if "method" not in df:
        return mark_calibrated(fallback, df)
    labels = df["method"].where(df["method"].notna() & (df["method"].astype(str) != ""), fallback).astype(str)
    return mark_calibrated(labels, df)


def roy_order(methods) -> list[str]:
    methods = list(dict.fromkeys(methods))
    return [m for m in ROY_METHODS if m in methods] + sorted(m for m in methods if m not in ROY_METHODS)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


SPREAD_NOTE = "cells over several seeds: mean ± sd (n=seeds)"


def with_spread(tab: pd.DataFrame, rows: pd.DataFrame, index: list[str], column: str | None,
                values: list[str]) -> pd.DataFrame:
    """Attach to ``tab`` (index columns + value columns) the sample sd and count of every cell pooled from
    more than one run of ``rows``; :func:`as_text` shows them. ``column``: the pivoted column (its values
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


def as_text(tab: pd.DataFrame) -> pd.DataFrame:
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
