"""The "Paired comparison vs the fp baseline" tables and the test-set calibration dagger, on synthetic
run records (report functions and the ``python -m quantlab.report`` CLI)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quantlab.metrics.paired import paired_bootstrap_mean_diff, paired_bootstrap_ppl
from quantlab.tracking.paired_table import WITHIN_NOISE, compare_items, format_paired, paired_tables, same_protocol
from quantlab.tracking.paper_tables import CALIB_FOOTNOTE, paper_tables
from quantlab.tracking.record import RunRecord, write_record
from quantlab.tracking.report import collect, main, print_tables, summary_table, to_frame

N = 40  # problems
FMT = {"bits": 4, "group_size": 128, "short_name": "w4g128a"}
CODE_PROV = {"decoding": "greedy", "max_new_tokens": 512, "n_samples": 1, "n_problems": N,
             "dataset": {"name": "humaneval", "path": "/data/HumanEval.jsonl.gz", "sha256": "ab" * 32}}
PPL_PROV = {"ppl_protocol": "gptq_nonoverlap", "seqlen": 64, "dataset": "wikitext2", "split": "test",
            "text_sha256": "cd" * 32}
WINDOW_TOKENS = 63
BASE_NLL = [WINDOW_TOKENS * (2.0 + 0.1 * (w % 5)) for w in range(12)]


def _passes(ids) -> dict[str, float]:
    return {f"HumanEval/{i}": float(i in set(ids)) for i in range(N)}


def _write(root: Path, name: str, quantizer: str, method: str, started: str, passed=None, protocol="plain",
           seed: int = 0, on_eval: list[str] | None = None, ppl_shift: float | None = None, old_style=False,
           n_items: int = N) -> None:
    """One ok run record; ``old_style``: a record written before per_item existed (no key at all)."""
    prov_code = {**CODE_PROV, "prompt_style" if name == "fp" else "protocol": protocol}
    per_item, metrics, prov = {}, {}, {}
    if passed is not None:
        items = {k: v for k, v in _passes(passed).items() if int(k.split("/")[1]) < n_items}
        per_item["humaneval/pass@1"] = items
        metrics["humaneval/pass@1"] = sum(items.values()) / len(items)
        prov["humaneval/pass@1"] = prov_code
        java = {f"java/{i}": v for i, v in enumerate(list(items.values())[:10])}
        per_item["babelcode/java/pass@1"] = java
        metrics["babelcode/java/pass@1"] = sum(java.values()) / len(java)
        prov["babelcode/java/pass@1"] = {**prov_code, "language": "java", "n_problems": 10}
    if ppl_shift is not None:
        windows = {str(w): [nll + WINDOW_TOKENS * ppl_shift * (1 + w % 3), WINDOW_TOKENS]
                   for w, nll in enumerate(BASE_NLL)}
        per_item["ppl/wikitext2"] = windows
        nll = sum(v for v, _ in windows.values())
        metrics["ppl/wikitext2"] = math.exp(nll / (WINDOW_TOKENS * len(windows)))
        prov["ppl/wikitext2"] = PPL_PROV
    rec = RunRecord(
        run_id=f"run-{name}", status="ok", experiment="sq_plus", output_dir=str(root / name),
        started_at=started, model={"name": "tiny-llama"}, quantizer={"name": quantizer, "config": {}},
        format=None if quantizer == "none" else FMT, quant_summary={"method_label": method}, seed=seed,
        calib={"name": "humaneval", "calibrated_on_eval_set": on_eval} if on_eval is not None else None,
        metrics=metrics, provenance=prov, per_item=per_item,
    )
    write_record(rec, root / name)
    if old_style:
        d = json.loads((root / name / "result.json").read_text())
        del d["per_item"]
        (root / name / "result.json").write_text(json.dumps(d))


BASE_PASS = range(20)  # the fp baseline passes 20 of 40


def build_tree(root: Path) -> Path:
    """The synthetic study below ``root`` (see the comments on each run)."""
    t = "2026-02-01T12:00:{:02d}.000+00:00"
    _write(root, "fp", "none", "fp32", t.format(0), BASE_PASS, ppl_shift=0.0)  # old records: prompt_style
    # fp run of another protocol, started later: must never be the baseline of the plain runs
    _write(root, "fp_chat", "none", "fp32", t.format(1), range(30), protocol="chat")
    # rtn: loses 15..19, gains 20, 21 -> b = 5, c = 2
    _write(root, "rtn", "rtn", "rtn w4g128a", t.format(2), [*range(15), 20, 21], ppl_shift=0.02)
    # SmoothQuant+ calibrated on HumanEval itself, two seeds: loses 8..19 / 10..19
    _write(root, "sq0", "smoothquant_plus", "smoothquant+ w4g128a", t.format(3), range(8),
           on_eval=["humaneval"], ppl_shift=0.05)
    _write(root, "sq1", "smoothquant_plus", "smoothquant+ w4g128a", t.format(4), range(10), seed=1,
           on_eval=["humaneval"])
    # the same method calibrated on held-out text: identical outcomes to the baseline
    _write(root, "sq_held", "smoothquant_plus", "smoothquant+ w4g128a", t.format(5), BASE_PASS, on_eval=[])
    _write(root, "gptq_chat", "gptq", "gptq w4g128a", t.format(6), range(27), protocol="chat")
    _write(root, "awq_instruct", "awq", "awq w4g128a", t.format(7), range(20), protocol="instruct")
    _write(root, "awq38", "awq", "awq w4g128a", t.format(8), range(19), n_items=38)
    _write(root, "bnb_old", "bnb", "bnb.nf4", t.format(9), old_style=True)
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path / "results")


def _arm(ids, n=N) -> np.ndarray:
    return np.array([float(i in set(ids)) for i in range(n)])


def _table(tables, metric: str) -> tuple[pd.DataFrame, list[str]]:
    (hit,) = [(tab, notes) for title, tab, notes in tables if f": {metric} on tiny-llama" in title]
    return hit[0].set_index("method"), hit[1]


def test_paired_rows_values_and_baseline_matching(tree):
    tables = paired_tables(collect(tree))
    tab, notes = _table(tables, "humaneval/pass@1")
    assert list(tab.index) == ["awq w4g128a (protocol plain)", "gptq w4g128a", "rtn w4g128a",
                               "smoothquant+ w4g128a", "smoothquant+ w4g128a† (seed 0)",
                               "smoothquant+ w4g128a† (seed 1)"]
    base = _arm(BASE_PASS)
    rtn = tab.loc["rtn w4g128a"]
    ref = paired_bootstrap_mean_diff(base, _arm([*range(15), 20, 21]))
    assert rtn["n items"] == 40 and rtn["fp baseline"] == 0.5 and rtn["method value"] == 17 / 40
    assert rtn["diff"] == pytest.approx(-0.075)
    assert (rtn["95% CI low"], rtn["95% CI high"]) == (ref.low, ref.high)
    assert rtn["95% CI low"] < 0 < rtn["95% CI high"] and rtn["marker"] == WITHIN_NOISE
    assert rtn["McNemar p"] == pytest.approx(2 * (1 + 7 + 21) / 2**7, rel=1e-12)  # b=5, c=2
    sq0, sq1 = tab.loc["smoothquant+ w4g128a† (seed 0)"], tab.loc["smoothquant+ w4g128a† (seed 1)"]
    assert sq0["diff"] == pytest.approx(-0.3) and sq0["95% CI high"] < 0 and sq0["marker"] == ""
    assert sq0["McNemar p"] == pytest.approx(2 / 2**12, rel=1e-12)  # b=12, c=0
    assert sq1["diff"] == pytest.approx(-0.25) and sq1["McNemar p"] == pytest.approx(2 / 2**10, rel=1e-12)
    held = tab.loc["smoothquant+ w4g128a"]
    assert (held["diff"], held["95% CI low"], held["95% CI high"], held["McNemar p"]) == (0.0, 0.0, 0.0, 1.0)
    assert held["marker"] == WITHIN_NOISE
    # the chat run is paired with the chat fp run (0.75), never with the plain one; no instruct baseline
    gptq = tab.loc["gptq w4g128a"]
    assert gptq["fp baseline"] == 0.75 and gptq["diff"] == pytest.approx(-0.075)
    assert "awq w4g128a (protocol instruct): no fp baseline with the same protocol; not compared" in notes
    awq = tab.loc["awq w4g128a (protocol plain)"]
    assert awq["n items"] == 38 and awq["fp baseline"] == 20 / 38
    assert "awq w4g128a (protocol plain): item sets differ; 38 in both (baseline 40, run 38)" in notes
    assert "baseline: run run-fp (seed 0, protocol plain)" in notes
    assert "baseline: run run-fp_chat (seed 0, protocol chat)" in notes
    assert notes[-1] == CALIB_FOOTNOTE


def test_paired_perplexity_rows_and_multilingual(tree):
    tables = paired_tables(collect(tree))
    tab, notes = _table(tables, "ppl/wikitext2")
    assert list(tab.index) == ["rtn w4g128a", "smoothquant+ w4g128a†"] and CALIB_FOOTNOTE in notes
    tok = np.full(12, float(WINDOW_TOKENS))
    for label, shift in [("rtn w4g128a", 0.02), ("smoothquant+ w4g128a†", 0.05)]:
        nll_b = np.array([v + WINDOW_TOKENS * shift * (1 + w % 3) for w, v in enumerate(BASE_NLL)])
        ppl_a, ppl_b = math.exp(sum(BASE_NLL) / tok.sum()), math.exp(nll_b.sum() / tok.sum())
        row = tab.loc[label]
        assert row["fp baseline"] == pytest.approx(ppl_a, rel=1e-12)
        assert row["method value"] == pytest.approx(ppl_b, rel=1e-12)
        assert row["diff"] == pytest.approx(ppl_b - ppl_a, rel=1e-9)
        assert row["ratio"] == pytest.approx(ppl_b / ppl_a, rel=1e-12)
        ref = paired_bootstrap_ppl(BASE_NLL, tok, nll_b, tok)
        assert (row["95% CI low"], row["95% CI high"]) == (ref.diff.low, ref.diff.high)
        assert (row["ratio CI low"], row["ratio CI high"]) == (ref.ratio.low, ref.ratio.high)
        assert 0 < row["95% CI low"] <= row["diff"] <= row["95% CI high"] and row["marker"] == ""
        assert pd.isna(row["McNemar p"])  # not binary outcomes
    java, _ = _table(tables, "babelcode/java/pass@1")
    assert "rtn w4g128a" in java.index and java.loc["rtn w4g128a", "n items"] == 10


def test_non_binary_items_and_protocol_rules():
    row = compare_items({"a": 0.2, "b": 1.0, "c": 0.6}, {"a": 0.4, "b": 0.8, "c": 0.6})
    assert row["McNemar p"] is None and row["diff"] == pytest.approx(0.0, abs=1e-12)
    text = format_paired(pd.DataFrame([{"method": "x", **row}]))
    assert text.loc[0, "McNemar p"] == "-" and text.loc[0, "diff"] in ("+0.0000", "-0.0000")
    with pytest.raises(ValueError, match="no item"):
        compare_items({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="kinds"):
        compare_items({"a": 1.0}, {"a": [3.0, 2]})
    old, new = {**CODE_PROV, "prompt_style": "plain"}, {**CODE_PROV, "protocol": "plain"}
    assert same_protocol(old, new) and not same_protocol(old, {**new, "protocol": "chat"})
    assert not same_protocol(new, {**new, "max_new_tokens": 768})
    assert not same_protocol(new, {**new, "dataset": {**CODE_PROV["dataset"], "sha256": "ef" * 32}})
    assert not same_protocol(PPL_PROV, {**PPL_PROV, "seqlen": 2048})
    assert not same_protocol(PPL_PROV, {**PPL_PROV, "ppl_protocol": "hf_strided", "stride": 512})


def test_dagger_in_summary_and_paper_tables(tree, capsys):
    records = collect(tree)
    summary = summary_table(to_frame(records))
    tables = dict(paper_tables(summary))
    t1 = tables["Table 1 shape: humaneval/pass@1 (method x model)"].set_index("method")
    # the flagged runs form their own row (mean of seeds 0 and 1), apart from the held-out run
    assert t1.loc["smoothquant+ w4g128a†", "tiny-llama"] == pytest.approx((8 + 10) / 80)
    assert t1.loc["smoothquant+ w4g128a†", "runs"] == 2
    assert t1.loc["smoothquant+ w4g128a", "tiny-llama"] == 0.5 and t1.loc["smoothquant+ w4g128a", "runs"] == 1
    (t2,) = [tab for title, tab in tables.items() if title.startswith("Table 2 shape: babelcode")]
    assert "smoothquant+ w4g128a†" in set(t2["method"])
    print_tables(summary, records=records)
    out = capsys.readouterr().out
    assert "smoothquant_plus†" in out and out.count(CALIB_FOOTNOTE) >= 4  # summary, T1, T2, paired tables
    assert "bnb" in out  # the record without per_item still renders


def test_report_cli_prints_and_writes_paired_tables(tree, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quantlab.report", str(tree), "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    md = (out_dir / "report.md").read_text(encoding="utf-8")
    for text in (proc.stdout, md):
        assert "Paired comparison vs the fp baseline: humaneval/pass@1 on tiny-llama (sq_plus)" in text
        assert "Paired comparison vs the fp baseline: ppl/wikitext2 on tiny-llama (sq_plus)" in text
        assert WITHIN_NOISE in text and CALIB_FOOTNOTE in text
        assert "-0.0750" in text and "0.453" in text and "0.000488" in text and "1.00" in text
    assert "| smoothquant+ w4g128a† (seed 0) | 40 | 0.5000 | 0.2000 | -0.3000 |" in md
    assert "| rtn w4g128a | 40 | 0.5000 | 0.4250 | -0.0750 |" in md
    assert main([str(tree), "--metrics", "ppl", "--out", str(tmp_path / "o2")]) == 0
    md2 = (tmp_path / "o2" / "report.md").read_text(encoding="utf-8")
    assert "ppl/wikitext2 on tiny-llama" in md2 and "humaneval/pass@1 on tiny-llama" not in md2


def test_records_without_per_item_render_without_paired_tables(tmp_path):
    root = tmp_path / "r"
    _write(root, "fp", "none", "fp32", "2026-01-01T00:00:00.000+00:00", old_style=True)
    _write(root, "rtn", "rtn", "rtn w4g128a", "2026-01-01T00:00:01.000+00:00", old_style=True)
    records = collect(root)
    assert all(r.per_item == {} for r in records) and paired_tables(records) == []
    assert main([str(root), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    assert "| tiny-llama | rtn |" in md and "Paired comparison" not in md and "†" not in md
