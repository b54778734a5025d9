"""Published tables next to our runs (quantlab.tracking.published) and the one-run bootstrap interval."""
from __future__ import annotations

import functools
import itertools
import math
import re
import shutil
import statistics

import numpy as np
import pytest
import yaml

from quantlab.errors import DataError
from quantlab.metrics.paired import bootstrap_value
from quantlab.tracking.llmqat_tables import CSR_TASKS
from quantlab.tracking.published import (
    CSR_AVG,
    NOT_RUN_TITLE,
    PUBLISHED_DIR,
    compare_table,
    load_published,
    metric_value,
    published_tables,
    run_settings,
)
from quantlab.tracking.record import RunRecord

TITLES = {
    "sqplus_table1": "SmoothQuant+ Table 1", "sqplus_table2": "SmoothQuant+ Table 2",
    "sqplus_table5": "SmoothQuant+ Table 5", "roy_table6": "Roy et al. (PTQ study) Table 6",
    "roy_table7": "Roy et al. (PTQ study) Table 7", "llmqat_table1": "LLM-QAT Table 1",
    "llmqat_table2": "LLM-QAT Table 2",
}
ARXIV = {"sqplus": "2312.03788", "roy": "2309.05210", "llmqat": "2305.17888"}


# ----------------------------------------------------------------------------- loading


def test_the_seven_tables_load_with_titles_and_sources():
    tables = load_published()
    assert [t.key for t in tables] == sorted(TITLES)
    for t in tables:
        assert t.title == TITLES[t.key]
        assert f"arXiv {ARXIV[t.key.split('_')[0]]}" in t.source
        assert f"Table {t.table}" in t.source and t.cells


def _copy_table(tmp_path, name="sqplus_table1"):
    d = tmp_path / "published"
    d.mkdir()
    shutil.copy(PUBLISHED_DIR / f"{name}.yaml", d / f"{name}.yaml")
    return d, d / f"{name}.yaml"


def test_a_table_missing_a_key_is_a_data_error_naming_the_file(tmp_path):
    d, path = _copy_table(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["arxiv"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match=r"sqplus_table1\.yaml.*arxiv"):
        load_published(d)


def test_a_cell_missing_a_key_is_a_data_error_naming_the_file(tmp_path):
    d, path = _copy_table(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["cells"][2]["value"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match=r"sqplus_table1\.yaml: cells\[2\] lacks \['value'\]"):
        load_published(d)


def test_invalid_yaml_is_a_data_error_naming_the_file(tmp_path):
    d = tmp_path / "published"
    d.mkdir()
    (d / "broken.yaml").write_text("paper: [unclosed\n")
    with pytest.raises(DataError, match=r"broken\.yaml"):
        load_published(d)


# ----------------------------------------------------------------------------- matching


def _r(label: str, quantizer: str) -> RunRecord:
    return RunRecord(run_id="r", status="ok", experiment="e", output_dir="/r", started_at="t",
                     quantizer={"name": quantizer}, quant_summary={"method_label": label})


@pytest.mark.parametrize("label, quantizer, settings", [
    ("fp16", "none", {"fp16", "16-16-16"}),
    ("bf16", "none", {"bf16", "16-16-16"}),
    ("fp32", "none", {"fp32"}),
    ("bnb.nf4-dq", "bnb", {"nf4-dq"}),
    ("rtn w4g128a", "rtn", {"w4g128a"}),
    ("llm_qat w4pcs 4-8-4", "llm_qat", {"4-8-4"}),
    ("llm_qat w4pcs 4-8-4 a:lsq", "llm_qat", {"4-8-4 a:lsq"}),  # a non-paper variant: never the paper's 4-8-4
    ("rtn w4pcs 4-16-16", "rtn", {"w4pcs"}),                   # weight-only: the format names it
    ("", "rtn", set()),
])
def test_run_settings(label, quantizer, settings):
    assert run_settings(_r(label, quantizer)) == settings


def test_metric_value_derives_the_csr_average():
    accs = [0.70, 0.78, 0.45, 0.73, 0.67, 0.52, 0.41, 0.39]
    metrics = {f"lm_eval/{t}/{m}": a for (t, m, _), a in zip(CSR_TASKS, accs)}
    assert len(metrics) == 8
    r = RunRecord(run_id="r", status="ok", experiment="e", output_dir="/r", started_at="t", metrics=metrics)
    assert metric_value(r, CSR_AVG) == pytest.approx(statistics.fmean(accs), abs=1e-15)
    assert metric_value(r, "lm_eval/boolq/acc") == 0.70
    t, m, _ = CSR_TASKS[3]
    del r.metrics[f"lm_eval/{t}/{m}"]
    assert metric_value(r, CSR_AVG) is None
    r.metrics["ppl/c4"] = float("nan")
    assert metric_value(r, "ppl/c4") is None and metric_value(r, "ppl/none") is None


# ----------------------------------------------------------------------------- one paper table vs our runs


N_ITEMS, N_PASS = 164, 90
PAPER = 0.5305  # SmoothQuant+ Table 1, Code Llama 34B, SmoothQuant+: 53.05%


def _sqplus(value=0.5488, protocol="sqplus", seed=0, deviations=None, run_id="sqp"):
    prov = {"protocol": protocol}
    if deviations:
        prov["protocol_deviations"] = deviations
    items = {f"HumanEval/{i}": 1.0 if i < N_PASS else 0.0 for i in range(N_ITEMS)}
    return RunRecord(run_id=run_id, status="ok", experiment="sqplus", output_dir=f"/r/{run_id}", started_at="t",
                     seed=seed, model={"name": "codellama_34b"}, quantizer={"name": "smoothquant_plus"},
                     quant_summary={"method_label": "smoothquant_plus w4g128a"},
                     metrics={"humaneval/pass@1": value}, provenance={"humaneval/pass@1": prov},
                     per_item={"humaneval/pass@1": items})


@functools.lru_cache(maxsize=1)
def _tables() -> tuple:
    return tuple(load_published())  # read-only below (compare_table does not modify a table)


def _sqplus_table1():
    (table,) = [t for t in _tables() if t.key == "sqplus_table1"]
    return table


def _binom_quantile(q: float, n: int, p: float) -> int:
    """Smallest k with P(Binomial(n, p) <= k) >= q (exact sums)."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k
    return n


def test_a_run_under_the_papers_protocol_goes_in_the_papers_column():
    frame, notes = compare_table(_sqplus_table1(), [_sqplus()])
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row["model"], row["paper row"], row["column"]) == ("codellama_34b", "SmoothQuant+", "34B")
    assert (row["paper"], row["ours"], row["ours - paper"]) == ("0.5305", "0.5488", "+0.0183")
    assert row["ours, other protocol"] == "-" and row["run"] == "smoothquant_plus w4g128a"

    low, high = map(float, re.fullmatch(r"\[(\S+), (\S+)\]", row["ours 95% CI"]).groups())
    assert low <= N_PASS / N_ITEMS <= high and low <= 0.5488 <= high
    assert row["paper in CI"] == ("yes" if low <= PAPER <= high else "no")
    # Independent check: the bootstrap distribution of a mean of 0/1 items is exactly Binomial(n, p_hat) / n.
    # Near its 2.5% / 97.5% quantiles one lattice step (1/164) carries ~0.008-0.011 of probability (pmf ~
    # phi(1.96) / sd, sd = sqrt(164 p (1 - p)) = 6.4), while 10,000 resamples estimate a CDF value with a
    # standard error of sqrt(0.025 * 0.975 / 10,000) = 0.0016. Here the exact quantile sits on an atom
    # boundary (P(X <= 77) = 0.0252, so the Monte Carlo 2.5% percentile may be 77/164 or 78/164); reaching a
    # second step would take a ~5 sigma error: at most one lattice step (plus 5e-5 for the 4-decimal text).
    p_hat = N_PASS / N_ITEMS
    exact_low = _binom_quantile(0.025, N_ITEMS, p_hat) / N_ITEMS
    exact_high = _binom_quantile(0.975, N_ITEMS, p_hat) / N_ITEMS
    assert abs(low - exact_low) <= 1 / N_ITEMS + 5e-5
    assert abs(high - exact_high) <= 1 / N_ITEMS + 5e-5
    ci = bootstrap_value([1.0] * N_PASS + [0.0] * (N_ITEMS - N_PASS))
    assert row["ours 95% CI"] == f"[{ci.low:.4f}, {ci.high:.4f}]"

    assert any("arXiv 2312.03788" in n for n in notes)
    (missing,) = [n for n in notes if n.startswith("no run yet")]
    assert missing.startswith("no run yet for 11 published row(s): ")
    assert "codellama_34b SmoothQuant+" not in missing and "codellama_7b FP16 (fp16)" in missing


def test_a_run_under_another_protocol_is_never_in_the_papers_column():
    (row,) = compare_table(_sqplus_table1(), [_sqplus(protocol="plain")])[0].to_dict("records")
    assert row["ours"] == "-" and row["ours - paper"] == "-" and row["paper in CI"] == "-"
    assert row["ours, other protocol"].startswith("0.5488 (") and "plain" in row["ours, other protocol"]
    assert row["ours, other protocol"].endswith("n=1)")


def test_a_recorded_protocol_deviation_is_another_protocol():
    (row,) = compare_table(_sqplus_table1(), [_sqplus(deviations=["max_new_tokens=512"])])[0].to_dict("records")
    assert row["ours"] == "-"
    assert "max_new_tokens=512" in row["ours, other protocol"] and "sqplus" in row["ours, other protocol"]


def test_two_seeds_give_mean_sd_and_n():
    values = [0.5488, 0.5610]
    records = [_sqplus(value=v, seed=i, run_id=f"s{i}") for i, v in enumerate(values)]
    (row,) = compare_table(_sqplus_table1(), records)[0].to_dict("records")
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    assert row["ours"] == f"{mean:.4f} ± {sd:.4f} (n=2)" == "0.5549 ± 0.0086 (n=2)"
    assert row["ours - paper"] == f"{mean - PAPER:+.4f}"
    assert row["ours 95% CI"] == "-" and row["paper in CI"] == "-"


def test_failed_runs_and_other_models_never_match():
    failed = _sqplus()
    failed.status = "failed"
    other = _sqplus()
    other.model = {"name": "codellama_7b_instruct"}
    frame, notes = compare_table(_sqplus_table1(), [failed, other])
    assert frame.empty and notes == [f"source: {_sqplus_table1().source}"]


def test_tables_with_no_matching_run_are_listed_once():
    out = published_tables([])
    assert len(out) == 1
    title, frame, _ = out[0]
    assert title == NOT_RUN_TITLE
    assert list(frame["table"]) == [TITLES[k] for k in sorted(TITLES)]
    out = published_tables([_sqplus()], _tables())
    assert [t for t, _, _ in out] == ["Published vs ours: SmoothQuant+ Table 1", NOT_RUN_TITLE]
    assert "SmoothQuant+ Table 1" not in set(out[-1][1]["table"]) and len(out[-1][1]) == 6


# ----------------------------------------------------------------------------- bootstrap_value


def test_bootstrap_value_of_numeric_items_is_their_mean():
    items = [0.0, 0.25, 1.0, 0.5, 1.0, 0.0, 0.75]
    ci = bootstrap_value(items)
    assert ci.observed == pytest.approx(statistics.fmean(items), abs=1e-15)
    assert ci.low <= ci.observed <= ci.high and ci.low < ci.high
    assert ci.n_items == 7 and ci.n_resamples == 10_000 and ci.seed == 0
    assert bootstrap_value(items, seed=3) == bootstrap_value(items, seed=3)


def test_bootstrap_value_of_window_items_is_the_perplexity():
    items = [[20.0, 10], [45.0, 15], [12.0, 8], [70.0, 30]]
    ci = bootstrap_value(items)
    assert ci.observed == pytest.approx(math.exp((20 + 45 + 12 + 70) / (10 + 15 + 8 + 30)), rel=1e-12)
    assert ci.observed != pytest.approx(statistics.fmean(math.exp(n / t) for n, t in items))  # not a mean of ppls
    assert ci.low <= ci.observed <= ci.high
    assert bootstrap_value(items, seed=1) == bootstrap_value(items, seed=1)


def test_identical_items_give_a_degenerate_interval():
    ci = bootstrap_value([1.0] * 50)
    assert (ci.observed, ci.low, ci.high) == (1.0, 1.0, 1.0)
    ppl = bootstrap_value([[2.0, 4]] * 9)
    assert ppl.low == ppl.high == ppl.observed == pytest.approx(math.exp(0.5), rel=1e-15)


@pytest.mark.parametrize("items, exact", [
    ([1.0, 0.0, 1.0, 1.0, 0.0], (0.2, 1.0)),
    ([1.0, 1.0, 1.0, 1.0, 0.0], (0.4, 1.0)),
])
def test_bootstrap_value_matches_the_exact_bootstrap_distribution(items, exact):
    """All 5**5 = 3125 equally likely resamples, with numpy.percentile (the same linear interpolation).

    The resampled mean is k/5, k ~ Binomial(5, p_hat). The items are chosen so that both percentiles fall
    well inside one atom: for p_hat = 0.6, P(k <= 0) = 0.010 and P(k <= 1) = 0.087 bracket 0.025, and
    P(k = 5) = 0.078 > 0.025; for p_hat = 0.8, P(k <= 1) = 0.007, P(k <= 2) = 0.058, P(k = 5) = 0.328. With
    10,000 resamples the empirical CDF has a standard error below sqrt(0.09 * 0.91 / 10,000) = 0.003, so
    it would take a > 5 sigma deviation to move a Monte Carlo percentile to a neighbouring atom: the
    Monte Carlo interval equals the exact one, not only approximately.
    """
    arr = np.asarray(items)
    means = np.array([arr[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])
    assert means.size == 3125
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert (lo, hi) == pytest.approx(exact, abs=1e-12)
    ci = bootstrap_value(items, n_resamples=10_000, seed=0)
    assert ci.observed == pytest.approx(arr.mean())
    assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12)


def test_llmqat_zero_shot_protocol_key_is_what_lm_eval_records():
    """The table's protocol must name a provenance key the lm-eval evaluator writes (``n_shot``), or no
    run could ever fill the paper's column."""
    import inspect

    from quantlab.evals import lm_eval_tasks

    (table,) = [t for t in load_published() if t.key == "llmqat_table1"]
    src = inspect.getsource(lm_eval_tasks._task_facts)
    for key in table.protocol:
        assert f'"{key}"' in src


def test_a_baseline_with_quantized_activations_is_not_the_full_precision_row():
    rec = RunRecord(run_id="r", status="ok", experiment="e", output_dir="", started_at="2026-01-01",
                    quantizer={"name": "none"}, quant_summary={"method_label": "fp16", "wakv": "16-8-8"})
    assert run_settings(rec) == {"16-8-8"}


def test_a_bnb_run_off_the_papers_compute_dtype_is_not_the_papers_row():
    rec = RunRecord(run_id="r", status="ok", experiment="e", output_dir="", started_at="2026-01-01",
                    quantizer={"name": "bnb"}, quant_summary={"method_label": "bnb.nf4 compute:fp16"})
    assert run_settings(rec) == {"nf4 compute:fp16"}
