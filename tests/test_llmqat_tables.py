"""LLM-QAT Table 1 / Table 2 shapes from run summaries (issue 6)."""
from __future__ import annotations

import pandas as pd

from quantlab.tracking.llmqat_tables import llmqat_table1, llmqat_table2
from quantlab.tracking.paper_tables import paper_tables


def _row(q, wakv, exp="llmqat", model="m7b", fmt="w4pcs", status="ok", **metrics):
    return {"experiment": exp, "model": model, "quantizer": q, "format": fmt, "wakv": wakv, "status": status, **metrics}


def _frame():
    return pd.DataFrame([
        _row("llm_qat", "4-8-4", **{"ppl/c4": 8.6, "lm_eval/boolq/acc": 0.70, "lm_eval/piqa/acc_norm": 0.80}),
        _row("rtn", "4-8-4", **{"ppl/c4": 55.1, "lm_eval/boolq/acc": 0.50, "lm_eval/piqa/acc_norm": 0.56}),
        _row("none", "16-16-16", fmt="fp", **{"ppl/c4": 7.2, "lm_eval/boolq/acc": 0.768, "lm_eval/piqa/acc_norm": 0.793}),
        _row("smoothquant", "4-8-8", **{"ppl/c4": 9.1}),
        _row("smoothquant", "4-8-8", **{"ppl/c4": 9.3}),  # a second seed: averaged
        _row("rtn", "4-8-8", status="failed", **{"ppl/c4": 1.0}),  # failed runs never fill a cell
        _row("rtn", "4-16-16", exp="weight_only", **{"ppl/c4": 7.5}),  # no W-A-KV run in that experiment
    ])


def test_table2_rows_follow_the_paper_order_and_average_seeds():
    (title, tab), = llmqat_table2(_frame())
    assert "Table 2" in title
    assert list(zip(tab["#Bits"], tab["Method"])) == [
        ("16-16-16", "m7b"), ("4-8-4", "RTN"), ("4-8-4", "LLM-QAT"), ("4-8-8", "SmoothQuant")]
    assert list(tab["m7b ppl/c4"]) == [7.2, 55.1, 8.6, 9.2]
    assert list(tab["runs"]) == [1, 1, 1, 2]


def test_table1_reports_percent_and_the_average_of_present_tasks():
    (title, tab), = llmqat_table1(_frame())
    assert "m7b" in title and "Avg over 2 of 8 tasks" in title
    assert list(tab.columns) == ["#Bits", "Method", "BoolQ", "PIQA", "Avg", "runs"]
    qat = tab[tab["Method"] == "LLM-QAT"].iloc[0]
    assert (qat["BoolQ"], qat["PIQA"], qat["Avg"]) == (70.0, 80.0, 75.0)
    assert "SmoothQuant" not in set(tab["Method"])  # no zero-shot metrics in that run


def test_weight_only_studies_grow_no_llmqat_table():
    df = _frame()
    df = df[df["experiment"] == "weight_only"]
    assert llmqat_table1(df) == [] and llmqat_table2(df) == []
    assert not any("LLM-QAT" in t for t, _ in paper_tables(df))
    assert any("LLM-QAT Table 2" in t for t, _ in paper_tables(_frame(), as_text=True))


def test_llm_qat_variants_get_their_own_rows():
    df = pd.DataFrame([
        {**_row("llm_qat", "4-8-16", **{"ppl/c4": 7.4}), "method": "llm_qat w4pcs 4-8-16"},
        {**_row("llm_qat", "4-8-16", **{"ppl/c4": 9.4}), "method": "llm_qat w4pcs 4-8-16 a:lsq"},
        {**_row("llm_qat", "4-8-16", **{"ppl/c4": 8.2}), "method": "llm_qat w4pcs 4-8-16 w:statsq"},
    ])
    (_, tab), = llmqat_table2(df)
    assert dict(zip(tab["Method"], tab["m7b ppl/c4"])) == {
        "LLM-QAT": 7.4, "LLM-QAT a:lsq": 9.4, "LLM-QAT w:statsq": 8.2}
