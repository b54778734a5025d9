"""scripts/bench_peers.py's bookkeeping: pairing A B A B runs, ratios per repetition, the perplexity
comparison, and peers that could not be installed or run staying in the table."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "scripts" / "bench_peers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(arm, rep, quant_s, peak, out, status="ok"):
    return {"arm": arm, "rep": rep, "status": status, "quant_s": quant_s, "peak_rss_bytes": peak * 2**30,
            "rss_start_bytes": 0.5 * 2**30, "out": out, "settings": {"x": arm}, "versions": {}}


def test_summary_pairs_each_repetition_and_compares_perplexity(bench):
    runs = [_run("peer", 0, 60.0, 1.0, "p0"), _run("ours", 0, 30.0, 0.9, "o0"),
            _run("peer", 1, 66.0, 1.0, "p1"), _run("ours", 1, 33.0, 1.1, "o1")]
    win_p = [[10.0, 5], [20.0, 5]]  # [nll_sum, tokens] per window
    win_o = [[10.5, 5], [19.5, 5]]
    evals = {"p0": {"ppl": 20.1, "windows": win_p}, "p1": {"ppl": 20.1, "windows": win_p},
             "o0": {"ppl": 20.1, "windows": win_o}, "o1": {"ppl": 20.1, "windows": win_o}}
    s = bench.summarize("gptq-llmcompressor", runs, evals)
    assert s["time_ratio"] == [0.5, 0.5]  # ours/peer within each repetition
    assert s["peak_rss_ratio"] == [0.9, 1.1]
    assert s["peer"]["quant_s"] == [60.0, 66.0] and s["ours"]["rss_increase_gib"] == [0.4, 0.6]
    # same total NLL and tokens: the perplexities are equal, the interval straddles 0
    assert s["ppl_diff"]["observed"] == pytest.approx(0.0, abs=1e-12)
    assert s["ppl_diff"]["ci95"][0] < 0 < s["ppl_diff"]["ci95"][1]
    summary = {"pairs": [s, {"pair": "awq-autoawq", "unavailable": "pip: no matching distribution"}],
               "fp_ppl": 9.7, "provenance": "test"}
    text = bench.table(summary)
    assert "not installable: pip: no matching distribution" in text  # reported, never left out
    assert "target gptq-llmcompressor peak_rss: worst ratio 1.100 (<= 1.0: MISSED)" in text
    assert "target gptq-llmcompressor time: worst ratio 0.500 (<= 0.6: met)" in text


def test_failed_runs_are_counted_not_dropped(bench):
    runs = [_run("peer", 0, 0, 0, "p0", status="failed (exit 1): boom"), _run("ours", 0, 30.0, 0.9, "o0")]
    s = bench.summarize("gptq-gptqmodel", runs, {"o0": {"ppl": 10.0, "windows": [[1.0, 1]]}})
    assert s["peer"]["n"] == 0 and s["peer"]["failed"] == ["failed (exit 1): boom"]
    assert "time_ratio" not in s  # nothing to pair with
    assert "1 failed: failed (exit 1): boom" in bench.table({"pairs": [s], "fp_ppl": 9.7, "provenance": "t"})
