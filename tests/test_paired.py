"""Paired statistics (bootstrap, exact McNemar) against independent references, and the per-item plumbing:
EvalResult -> RunRecord, perplexity's per-window data (metric bits unchanged)."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.evals.perplexity import IGNORE_INDEX, PerplexityEval, _forward_logits, nll_of_window
from quantlab.experiment import RunExtras, _merge_eval
from quantlab.metrics.paired import (
    binom_half_cdf_exact,
    is_binary,
    mcnemar_exact,
    paired_bootstrap_mean_diff,
    paired_bootstrap_ppl,
)
from quantlab.models.tiny import build_tiny_llama
from quantlab.tracking.record import RunRecord, read_record, write_record
from quantlab.types import EvalResult, RunContext

Z975 = 1.959963984540054  # standard normal 97.5th percentile


# ----------------------------------------------------------------------------- McNemar


def _arms(b: int, c: int, both: int = 3, neither: int = 4) -> tuple[list[int], list[int]]:
    """Paired outcomes with ``b`` items passed by A only, ``c`` by B only, plus concordant ones."""
    a = [1] * b + [0] * c + [1] * both + [0] * neither
    o = [0] * b + [1] * c + [1] * both + [0] * neither
    return a, o


def _mcnemar_by_enumeration(b: int, c: int) -> float:
    """Reference: enumerate every assignment of the b + c discordant items to "A only" / "B only" (each
    equally likely under H0) and count those at least as extreme as min(b, c) on the lower side."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    low = sum(1 for signs in itertools.product((0, 1), repeat=n) if sum(signs) <= k)
    return min(1.0, float(2 * Fraction(low, 2**n)))


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (0, 5), (1, 7), (5, 2), (4, 4), (6, 7), (2, 12)])
def test_mcnemar_matches_enumeration(b, c):
    a, o = _arms(b, c)
    res = mcnemar_exact(a, o)
    assert (res.b, res.c) == (b, c)
    assert res.p_value == pytest.approx(_mcnemar_by_enumeration(b, c), rel=1e-12, abs=1e-15)
    assert mcnemar_exact(o, a).p_value == pytest.approx(res.p_value, rel=1e-12)  # symmetric in the arms


def test_mcnemar_textbook_example_and_concordant_items_irrelevant():
    # Fagerland, Lydersen & Laake (2013), BMC Med. Res. Methodol. 13:91, airway hyper-responsiveness
    # example: 1 vs 7 discordant pairs, exact conditional p = 0.070 (= 2 * 9/256 = 0.0703125 by hand)
    a, o = _arms(1, 7, both=50, neither=10)
    assert mcnemar_exact(a, o).p_value == pytest.approx(0.0703125, rel=1e-12)
    a2, o2 = _arms(1, 7, both=0, neither=0)
    assert mcnemar_exact(a2, o2).p_value == mcnemar_exact(a, o).p_value


def test_binomial_cdf_exact_agrees_with_scipy_path():
    from quantlab.metrics.paired import _binom_half_cdf

    for k, n in [(0, 1), (2, 7), (10, 30), (200, 500), (250, 500)]:
        assert _binom_half_cdf(k, n) == pytest.approx(binom_half_cdf_exact(k, n), rel=1e-9)
    assert binom_half_cdf_exact(2, 7) == (1 + 7 + 21) / 128


def test_mcnemar_rejects_non_binary_and_mismatched():
    assert is_binary([0, 1, 1.0, 0.0]) and not is_binary([0, 0.5, 1])
    with pytest.raises(ValueError, match="binary"):
        mcnemar_exact([0, 0.5], [1, 0])
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([0, 1], [1])


# ----------------------------------------------------------------------------- bootstrap


def test_identical_arms_and_constant_shift_have_degenerate_intervals():
    rng = np.random.default_rng(3)
    a = (rng.random(164) < 0.4).astype(float)
    ci = paired_bootstrap_mean_diff(a, a)
    assert (ci.observed, ci.low, ci.high, ci.n_items, ci.n_resamples) == (0.0, 0.0, 0.0, 164, 10_000)
    assert ci.contains(0.0)
    shifted = paired_bootstrap_mean_diff(a, a + 0.25)  # every paired difference is 0.25
    assert (shifted.observed, shifted.low, shifted.high) == (0.25, 0.25, 0.25) and not shifted.contains(0.0)
    nll, tok = rng.random(20) * 50 + 100, np.full(20, 63.0)
    same = paired_bootstrap_ppl(nll, tok, nll, tok)
    assert (same.diff.low, same.diff.high, same.ratio.low, same.ratio.high) == (0.0, 0.0, 1.0, 1.0)
    assert same.ppl_a == same.ppl_b == pytest.approx(math.exp(nll.sum() / tok.sum()), rel=1e-12)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    a, b = rng.random(300), rng.random(300)
    assert paired_bootstrap_mean_diff(a, b, seed=7) == paired_bootstrap_mean_diff(a, b, seed=7)
    assert paired_bootstrap_mean_diff(a, b, seed=7) != paired_bootstrap_mean_diff(a, b, seed=8)
    tok = np.full(300, 10.0)
    assert paired_bootstrap_ppl(a, tok, b, tok, seed=1) == paired_bootstrap_ppl(a, tok, b, tok, seed=1)


def _exact_bootstrap_quantiles(stat, n: int, qs: list[float]) -> list[float]:
    """Quantiles of the exact bootstrap distribution: all n**n equally likely ordered resamples."""
    values = np.sort([stat(np.array(idx)) for idx in itertools.product(range(n), repeat=n)])
    return [float(values[min(int(q * len(values)), len(values) - 1)]) for q in qs]


def test_percentile_interval_matches_exact_bootstrap_distribution():
    # n = 5 items: the bootstrap distribution is known exactly (5**5 = 3125 resamples). The Monte Carlo
    # 2.5% quantile from 10,000 resamples has a sampling sd of sqrt(.025 * .975 / 1e4) = 0.0016 in
    # probability, so it must fall between the exact 1.8% and 3.2% quantiles (> 4 sd); same for 97.5%.
    a = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    b = np.array([0.3, 1.0, 0.7, 0.2, 1.0])
    d = b - a
    lo1, lo2, hi1, hi2 = _exact_bootstrap_quantiles(lambda i: d[i].mean(), 5, [0.018, 0.032, 0.968, 0.982])
    ci = paired_bootstrap_mean_diff(a, b, seed=11)
    assert lo1 <= ci.low <= lo2 and hi1 <= ci.high <= hi2
    # ratio of sums (perplexity): both arms recomputed on the same resampled windows
    nll_a = np.array([200.0, 260.0, 180.0, 300.0, 240.0])
    nll_b = np.array([205.0, 275.0, 181.0, 330.0, 238.0])
    tok = np.array([63.0, 63.0, 40.0, 63.0, 63.0])

    def ratio(i):
        return math.exp(nll_b[i].sum() / tok[i].sum()) / math.exp(nll_a[i].sum() / tok[i].sum())

    lo1, lo2, hi1, hi2 = _exact_bootstrap_quantiles(ratio, 5, [0.018, 0.032, 0.968, 0.982])
    res = paired_bootstrap_ppl(nll_a, tok, nll_b, tok, seed=11)
    assert lo1 <= res.ratio.low <= lo2 and hi1 <= res.ratio.high <= hi2
    assert res.ratio.observed == pytest.approx(ratio(np.arange(5)), rel=1e-12)
    ppl_a, ppl_b = math.exp(nll_a.sum() / tok.sum()), math.exp(nll_b.sum() / tok.sum())
    assert res.diff.observed == pytest.approx(ppl_b - ppl_a)


def test_large_n_agrees_with_normal_approximation():
    # n = 4000 paired binary outcomes, 10% flipped: the percentile interval ~ mean +- 1.96 SE. Measured
    # endpoint deviation on 5 such data sets (seeds 100-104): at most 0.058 SE; tolerance 0.15 SE.
    rng = np.random.default_rng(100)
    a = (rng.random(4000) < 0.45).astype(float)
    b = np.where(rng.random(4000) < 0.1, 1 - a, a)
    d = b - a
    se = d.std() / math.sqrt(len(d))
    ci = paired_bootstrap_mean_diff(a, b)
    assert abs(ci.low - (d.mean() - Z975 * se)) < 0.15 * se
    assert abs(ci.high - (d.mean() + Z975 * se)) < 0.15 * se
    # perplexity ratio vs the delta method for log(ratio) = sum(nll_b - nll_a) / sum(tok) (a ratio
    # estimator); measured deviation on 3 data sets (seeds 200-202): at most 0.059 SE of log(ratio)
    rng = np.random.default_rng(200)
    tok = rng.integers(50, 200, 3000).astype(float)
    nll_a = tok * (2 + rng.random(3000))
    nll_b = nll_a + tok * (0.05 * rng.standard_normal(3000) + 0.01)
    res = paired_bootstrap_ppl(nll_a, tok, nll_b, tok)
    resid = (nll_b - nll_a) - tok * (nll_b - nll_a).sum() / tok.sum()
    se_log = math.sqrt(len(tok)) * resid.std() / tok.sum()
    log_r = math.log(res.ratio.observed)
    assert abs(math.log(res.ratio.low) - (log_r - Z975 * se_log)) < 0.15 * se_log
    assert abs(math.log(res.ratio.high) - (log_r + Z975 * se_log)) < 0.15 * se_log


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_mean_diff([1, 0], [1])
    with pytest.raises(ValueError, match="no paired items"):
        paired_bootstrap_mean_diff([], [])
    with pytest.raises(ValueError, match="no scored tokens"):
        paired_bootstrap_ppl([1.0], [0.0], [1.0], [0.0])


# ----------------------------------------------------------------------------- plumbing


def test_merge_eval_per_item_and_duplicates():
    rec = RunRecord(run_id="r", status="ok", experiment="e", output_dir=".", started_at="t")
    ev = SimpleNamespace(kind="humaneval")
    res = EvalResult(metrics={"humaneval/pass@1": 0.5}, per_item={"humaneval/pass@1": {"HumanEval/0": 1.0}})
    _merge_eval(rec, RunExtras(), ev, res, 1.0)
    assert rec.per_item == {"humaneval/pass@1": {"HumanEval/0": 1.0}}
    with pytest.raises(ConfigError, match="per-item"):
        _merge_eval(rec, RunExtras(), ev, EvalResult(per_item={"humaneval/pass@1": {}}), 1.0)
    assert rec.metrics == {"humaneval/pass@1": 0.5}


def test_record_per_item_roundtrip_old_records_and_calib_flag(tmp_path: Path):
    rec = RunRecord(run_id="r", status="ok", experiment="e", output_dir=str(tmp_path), started_at="t",
                    per_item={"ppl/x": {"0": [12.5, 63], "1": [11.0, 63]}},
                    calib={"name": "humaneval", "calibrated_on_eval_set": ["humaneval"]})
    write_record(rec, tmp_path)
    back = read_record(tmp_path)
    assert back.per_item == {"ppl/x": {"0": [12.5, 63], "1": [11.0, 63]}}
    assert back.flat()["calibrated_on_eval_set"] is True
    old = json.loads((tmp_path / "result.json").read_text())
    del old["per_item"]
    old["calib"] = None
    (tmp_path / "result.json").write_text(json.dumps(old))
    legacy = read_record(tmp_path)
    assert legacy.per_item == {} and legacy.flat()["calibrated_on_eval_set"] is False
    for calib, flag in [({"calibrated_on_eval_set": []}, False), ({"name": "wikitext2"}, False),
                        ({"calibrated_on_eval_set": ["humaneval", "mbpp"]}, True)]:
        legacy.calib = calib
        assert legacy.flat()["calibrated_on_eval_set"] is flag


# ----------------------------------------------------------------------------- perplexity per window

TEXT = ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n") * 3


def _old_score(ev: PerplexityEval, model, tokens: torch.Tensor, windows) -> tuple[float, int]:
    """The scoring loop as it was before per-window data: one nll_of_window per batch of windows."""
    batches: list[list] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < ev.batch_size and last[0][1] - last[0][0] == w[1] - w[0]:
            last.append(w)
        else:
            batches.append([w])
    total, count = 0.0, 0
    for batch in batches:
        ids = torch.stack([tokens[b:e] for b, e, _ in batch])
        targets = ids[:, 1:].clone()
        for row, (b, e, trg_len) in enumerate(batch):
            targets[row, : targets.shape[1] - min(trg_len, e - b - 1)] = IGNORE_INDEX
        nll, n = nll_of_window(_forward_logits(model, ids)[:, :-1], targets)
        total, count = total + nll, count + n
    return total, count


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("protocol,stride,batch_size",
                         [("gptq_nonoverlap", 64, 1), ("gptq_nonoverlap", 64, 3), ("hf_strided", 24, 2)])
def test_perplexity_per_window_data_and_unchanged_metric(tmp_path, protocol, stride, batch_size):
    model, tok = build_tiny_llama()
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ev = PerplexityEval(name="t", path=str(path), protocol=protocol, seqlen=64, stride=stride,
                        batch_size=batch_size)
    res = ev.run(model, tok, RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path))
    prov, windows = res.provenance["ppl/t"], res.per_item["ppl/t"]
    tokens, _ = ev._tokens(tok)
    wins = ev._windows(int(tokens.numel()))
    with torch.no_grad():
        nll, count = _old_score(ev, model, tokens, wins)
    assert res.metrics["ppl/t"] == math.exp(nll / count)  # bit-identical to the code before per-window data
    assert prov["mean_nll"] == nll / count and prov["n_tokens_scored"] == count
    assert list(windows) == [str(i) for i in range(len(wins))] == [str(i) for i in range(prov["n_windows"])]
    assert sum(n for _, n in windows.values()) == count
    assert sum(v for v, _ in windows.values()) == pytest.approx(nll, rel=1e-12)
    with torch.no_grad():  # each window alone (batched forward may differ in the last bits)
        for i, (b, e, trg) in enumerate(wins):
            alone = _old_score(ev, model, tokens, [(b, e, trg)])
            assert windows[str(i)][1] == alone[1] and windows[str(i)][0] == pytest.approx(alone[0], rel=1e-5)


# ----------------------------------------------------------------------------- end to end


def test_pipeline_records_windows_and_report_pairs_them(tmp_path):
    from conftest import compose

    from quantlab.cli import run
    from quantlab.tracking.paired_table import paired_tables
    from quantlab.tracking.report import collect

    common = ["+exp=demo_tiny", "eval=[ppl_local]", "eval.ppl_local.max_windows=4"]
    fp = run(compose([*common, "quantizer=none"]), tmp_path / "fp")
    rtn = run(compose([*common, "quantizer=rtn"]), tmp_path / "rtn")
    (metric,) = rtn.metrics.keys() & rtn.per_item.keys()
    on_disk = json.loads((tmp_path / "rtn" / "result.json").read_text())
    windows = on_disk["per_item"][metric]
    assert list(windows) == ["0", "1", "2", "3"]
    nll, n = sum(v for v, _ in windows.values()), sum(c for _, c in windows.values())
    assert math.exp(nll / n) == pytest.approx(rtn.metrics[metric], rel=1e-12)
    ((title, tab, notes),) = paired_tables(collect(tmp_path))
    assert metric in title and list(tab["method"]) == [rtn.quant_summary["method_label"]]
    row = tab.iloc[0]
    assert row["fp baseline"] == pytest.approx(fp.metrics[metric], rel=1e-12)
    assert row["method value"] == pytest.approx(rtn.metrics[metric], rel=1e-12) and row["n items"] == 4
    assert f"baseline: run {fp.run_id} (seed 0, protocol gptq_nonoverlap)" in notes
