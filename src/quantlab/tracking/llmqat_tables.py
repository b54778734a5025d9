"""LLM-QAT's table shapes, built from whatever runs are present.

* Table 1 shape: zero-shot common-sense reasoning accuracy (%), one row per (W-A-KV, method), one
  column per task and their average; one table per model. Task metrics as the LLaMA paper reports them
  (``conf/eval/zeroshot_csr.yaml``): acc for BoolQ, SIQA, WinoGrande; acc_norm for the others.
* Table 2 shape: perplexity, one row per (W-A-KV, method), one column per (model, perplexity metric).

Only experiments holding at least one W-A-KV run (activations or KV cache quantized, or LLM-QAT) are
tabled, so weight-only studies do not grow an LLM-QAT table. The full-precision baseline's row is named
after the model (``16-16-16``). Cells average the successful runs (seeds of one variant: ``mean ± sd (n=k)``
in text, :func:`~quantlab.tracking.paper_tables.with_spread`); ``runs`` counts them. Avg is the mean of each
run's task average.
"""
from __future__ import annotations

import pandas as pd

from quantlab.formats.wakv import PAPER_SETTINGS
from quantlab.tracking.cells import with_spread

CSR_TASKS = (("boolq", "acc", "BoolQ"), ("piqa", "acc_norm", "PIQA"), ("social_iqa", "acc", "SIQA"),
             ("hellaswag", "acc_norm", "HellaSwag"), ("winogrande", "acc", "WinoGrande"),
             ("arc_easy", "acc_norm", "ARC-e"), ("arc_challenge", "acc_norm", "ARC-c"),
             ("openbookqa", "acc_norm", "OBQA"))
METHOD_NAMES = {"rtn": "RTN", "smoothquant": "SmoothQuant", "gptq": "GPTQ", "awq": "AWQ",
                "smoothquant_plus": "SmoothQuant+", "llm_qat": "LLM-QAT"}
_METHOD_ORDER = ("RTN", "SmoothQuant", "GPTQ", "AWQ", "SmoothQuant+", "LLM-QAT")
_BITS_ORDER = ("16-16-16", *PAPER_SETTINGS)


def _is_wakv_run(row: pd.Series) -> bool:
    w = str(row.get("wakv") or "")
    return row.get("quantizer") == "llm_qat" or (w.count("-") == 2 and w.split("-")[1:] != ["16", "16"])


def _rows(summary: pd.DataFrame) -> pd.DataFrame:
    """Successful runs of experiments with a W-A-KV run, with ``#Bits`` and ``Method`` columns."""
    df = summary[summary["status"] == "ok"] if "status" in summary else summary
    if df.empty or "wakv" not in df:
        return df.iloc[0:0]
    df = df[df["wakv"].notna()]
    wanted = {e for e, sub in df.groupby(df["experiment"].fillna("")) if sub.apply(_is_wakv_run, axis=1).any()}
    df = df[df["experiment"].fillna("").isin(wanted)]
    if df.empty:
        return df
    labels = df["method"] if "method" in df else pd.Series(None, index=df.index)
    names = [(str(m) if q == "none" else " ".join([METHOD_NAMES.get(q, str(q)), *_variant(lab, w)])) + _knobs(lab)
             for q, m, lab, w in zip(df["quantizer"], df["model"], labels, df["wakv"])]
    df = df.assign(**{"#Bits": df["wakv"].astype(str), "Method": names})
    fmt = df["format"].fillna("").astype(str) if "format" in df else pd.Series("", index=df.index)
    clash = df.assign(_f=fmt).groupby(["model", "#Bits", "Method"])["_f"].transform("nunique") > 1
    return df.assign(Method=df["Method"].where(~clash, df["Method"] + " " + fmt))


def _variant(label: object, wakv: str) -> list[str]:
    """What a method label adds after its W-A-KV (``llm_qat w4pcs 4-8-4 a:lsq`` -> ``["a:lsq"]``), without
    the report's knob suffix (:func:`_knobs`)."""
    tokens = str(label).split(" [")[0].split() if isinstance(label, str) else []
    return tokens[tokens.index(wakv) + 1:] if wakv in tokens else []


def _knobs(label: object) -> str:
    """The report's ``[knob=value ...]`` suffix of a label (variants sharing a method label), or ``""``."""
    return f" [{label.split(' [', 1)[1]}" if isinstance(label, str) and " [" in label else ""


def _order(frame: pd.DataFrame) -> pd.DataFrame:
    def key(bits: str, method: str) -> tuple:
        b = _BITS_ORDER.index(bits) if bits in _BITS_ORDER else len(_BITS_ORDER)
        base = method.split(" ")[0]
        m = _METHOD_ORDER.index(base) if base in _METHOD_ORDER else (-1 if bits == "16-16-16" else len(_METHOD_ORDER))
        return b, bits, m, method

    keys = [key(b, m) for b, m in zip(frame["#Bits"], frame["Method"])]
    return frame.iloc[sorted(range(len(frame)), key=keys.__getitem__)].reset_index(drop=True)


def llmqat_table1(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]`` per model: (#Bits, Method) x zero-shot task accuracy (%) and Avg."""
    df = _rows(summary)
    cols = {label: f"lm_eval/{task}/{metric}" for task, metric, label in CSR_TASKS}
    cols = {label: c for label, c in cols.items() if c in df and df[c].notna().any()}
    if df.empty or not cols:
        return []
    out = []
    for model, rows in df.groupby("model", sort=True):
        rows = rows[rows[list(cols.values())].notna().any(axis=1)]
        if rows.empty:
            continue
        pct = rows.rename(columns={c: label for label, c in cols.items()})
        pct[list(cols)] = pct[list(cols)] * 100
        pct["Avg"] = pct[list(cols)].mean(axis=1, skipna=False)
        tab = pct.groupby(["#Bits", "Method"])[[*cols, "Avg"]].mean()
        tab["runs"] = rows.groupby(["#Bits", "Method"]).size()
        title = (f"LLM-QAT Table 1 shape: {model} zero-shot accuracy % (#Bits W-A-KV x method; "
                 f"Avg over {len(cols)} of {len(CSR_TASKS)} tasks)")
        out.append((title, with_spread(_order(tab.reset_index()), pct, ["#Bits", "Method"], None, [*cols, "Avg"])))
    return out


def llmqat_table2(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``[(title, frame)]``: (#Bits, Method) x (model, perplexity metric)."""
    df = _rows(summary)
    ppl = sorted(c for c in df.columns if str(c).startswith("ppl/") and df[c].notna().any())
    if df.empty or not ppl:
        return []
    sub = df[df[ppl].notna().any(axis=1)]
    long = sub.melt(id_vars=["model", "#Bits", "Method"], value_vars=ppl, var_name="metric").dropna(subset=["value"])
    long["column"] = long["model"].astype(str) + " " + long["metric"]
    tab = long.pivot_table(index=["#Bits", "Method"], columns="column", values="value", aggfunc="mean")
    tab.columns.name = None
    tab["runs"] = sub.groupby(["#Bits", "Method"]).size()
    return [("LLM-QAT Table 2 shape: perplexity (#Bits W-A-KV x method; columns: model metric)",
             with_spread(_order(tab.reset_index()), long, ["#Bits", "Method"], "column", ["value"]))]
