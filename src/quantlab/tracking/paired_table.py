"""The "Paired comparison vs the fp baseline" tables, from the runs' per-item outcomes.

For every experiment, model and metric with per-item data (:attr:`RunRecord.per_item`), each ok run of a
method is compared with the ok full-precision run (``quantizer == "none"``) of the same model whose
provenance for that metric has the same protocol (:func:`protocol_signature`), on the items scored in
both: the difference with a paired bootstrap 95% interval, and for binary outcomes the exact McNemar
p-value (:mod:`quantlab.metrics.paired`). Runs of a method with several seeds get one row each (never
pooled). Item values are either numbers (the metric is their mean: pass@1 per problem) or
``[nll_sum, n_tokens]`` per window (the metric is ``exp(sum nll / sum n)``: perplexity, for which the
ratio of the two perplexities is reported too).
"""
from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from quantlab.metrics.paired import (
    N_RESAMPLES,
    is_binary,
    mcnemar_exact,
    paired_bootstrap_mean_diff,
    paired_bootstrap_ppl,
)
from quantlab.tracking.cells import calib_footnotes, method_labels
from quantlab.tracking.record import RunRecord

logger = logging.getLogger(__name__)

WITHIN_NOISE = "within noise"
TITLE = "Paired comparison vs the fp baseline"
#: provenance fields that must be equal (missing counts as None) for two runs to share a protocol
STRICT_FIELDS = ("decoding", "temperature", "top_k", "top_p", "max_new_tokens", "n_samples", "n_problems",
                 "language", "k", "seqlen", "stride", "c4_windows", "c4_seed")
#: compared only when both runs recorded them (newer records carry more detail)
SOFT_FIELDS = ("protocol_spec", "instruction")
COLUMNS = ("method", "n items", "fp baseline", "method value", "diff", "95% CI low", "95% CI high",
           "McNemar p")
RATIO_COLUMNS = ("ratio", "ratio CI low", "ratio CI high")


def protocol_signature(prov: dict[str, Any]) -> dict[str, Any]:
    """The provenance facts that define a metric's protocol (two runs are comparable when equal).

    ``protocol`` is the recorded ``protocol`` (code evals), else ``ppl_protocol`` (perplexity), else the
    older code records' ``prompt_style``. ``data`` is the dataset identity: a code eval's dataset
    ``sha256`` (else its path, else its name); for perplexity the dataset name, split and text hash.
    """
    ds = prov.get("dataset")
    if isinstance(ds, dict):
        data: Any = ds.get("sha256") or ds.get("path") or ds.get("name")
    else:
        data = [ds, prov.get("split"), prov.get("text_sha256") or prov.get("path")]
    names = ("protocol", "ppl_protocol", "prompt_style")
    protocol = next((prov[k] for k in names if prov.get(k) is not None), None)
    return {"protocol": protocol, "data": data, **{k: prov.get(k) for k in STRICT_FIELDS}}


def same_protocol(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when the provenance dicts ``a`` and ``b`` of one metric describe the same protocol."""
    if protocol_signature(a) != protocol_signature(b):
        return False
    return all(a[k] == b[k] for k in SOFT_FIELDS if a.get(k) is not None and b.get(k) is not None)


def _kind(value: Any) -> str | None:
    """``mean`` for a number, ``ppl`` for an ``[nll_sum, n_tokens]`` pair, None for anything else."""
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return "mean"
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if pair and all(isinstance(v, numbers.Real) and math.isfinite(float(v)) for v in value):
        return "ppl"
    return None


def _natural(key: str) -> tuple:
    """Sort key putting ``HumanEval/2`` before ``HumanEval/10`` and window ``"2"`` before ``"10"``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(key)))


def compare_items(base: dict[str, Any], run: dict[str, Any], n_resamples: int = N_RESAMPLES,
                  seed: int = 0) -> dict[str, Any]:
    """Numeric cells of one row: ``run`` against ``base`` on the items present (and valid) in both, in
    natural order of their ids (the resampled indices refer to that order).

    Raises:
        ValueError: no common item, or the two arms hold values of different kinds.
    """
    keys = sorted((k for k in set(base) & set(run) if _kind(base[k]) and _kind(run[k])), key=_natural)
    kinds = cast(set[str], {_kind(base[k]) for k in keys} | {_kind(run[k]) for k in keys})  # keys: items with a kind
    if not keys:
        raise ValueError("no item scored in both runs")
    if len(kinds) != 1:
        raise ValueError(f"item values of different kinds {sorted(kinds)}")
    row: dict[str, Any] = {"n items": len(keys)}
    if kinds == {"ppl"}:
        a, b = (np.array([side[k] for k in keys], dtype=np.float64) for side in (base, run))
        res = paired_bootstrap_ppl(a[:, 0], a[:, 1], b[:, 0], b[:, 1], n_resamples, seed)
        ci, p = res.diff, None
        row.update({"fp baseline": res.ppl_a, "method value": res.ppl_b})
        row.update(zip(RATIO_COLUMNS, (res.ratio.observed, res.ratio.low, res.ratio.high)))
    else:
        a, b = (np.array([float(side[k]) for k in keys]) for side in (base, run))
        ci = paired_bootstrap_mean_diff(a, b, n_resamples, seed)
        p = mcnemar_exact(a, b).p_value if is_binary(a) and is_binary(b) else None
        row.update({"fp baseline": float(a.mean()), "method value": float(b.mean())})
    row.update({"diff": ci.observed, "95% CI low": ci.low, "95% CI high": ci.high, "McNemar p": p,
                "marker": WITHIN_NOISE if ci.contains(0.0) else ""})
    return row


def _pick_baseline(run: RunRecord, metric: str, pool: list[RunRecord]) -> RunRecord | None:
    """The matching fp run: same protocol; then same experiment, same seed, latest start preferred."""
    prov = run.provenance.get(metric) or {}
    matches = [b for b in pool if b is not run and same_protocol(b.provenance.get(metric) or {}, prov)]
    matches.sort(key=lambda b: b.started_at or "", reverse=True)
    matches.sort(key=lambda b: (b.experiment != run.experiment, b.seed != run.seed))
    return matches[0] if matches else None


def _labels(runs: list[RunRecord], metric: str) -> list[str]:
    """Method labels (with ``†``); runs sharing a label are told apart by what differs among them:
    the metric's protocol, the seed, and failing both the run id."""
    labels = list(method_labels(pd.DataFrame.from_records([r.flat() for r in runs])))
    proto = [protocol_signature(r.provenance.get(metric) or {})["protocol"] for r in runs]
    out = []
    for i, (r, label) in enumerate(zip(runs, labels)):
        same = [j for j, lab in enumerate(labels) if lab == label]
        parts = [f"protocol {proto[i]}"] if len({str(proto[j]) for j in same}) > 1 else []
        parts += [f"seed {r.seed}"] if len({runs[j].seed for j in same}) > 1 else []
        if sum(str(proto[j]) == str(proto[i]) and runs[j].seed == r.seed for j in same) > 1:
            parts.append(r.run_id)
        out.append(f"{label} ({', '.join(parts)})" if parts else label)
    return out


def _metric_block(metric: str, runs: list[RunRecord], pool: list[RunRecord], n_resamples: int,
                  seed: int) -> tuple[pd.DataFrame, list[str]] | None:
    """(rows, notes) of one metric in one experiment and model; None when no method run has items."""
    runs = [r for r in runs if r.per_item.get(metric) and (r.quantizer or {}).get("name") != "none"]
    if not runs:
        return None
    labels = _labels(runs, metric)
    order = sorted(range(len(runs)), key=lambda i: (labels[i], runs[i].seed, runs[i].run_id))
    rows, notes, used = [], [], {}
    for i in order:
        run, label = runs[i], labels[i]
        base = _pick_baseline(run, metric, pool)
        if base is None:
            why = "no fp baseline with the same protocol" if pool else "no ok fp run has per-item data"
            notes.append(f"{label}: {why}; not compared")
            continue
        items_b, items_r = base.per_item[metric], run.per_item[metric]
        try:
            row = compare_items(items_b, items_r, n_resamples, seed)
        except ValueError as exc:
            notes.append(f"{label}: not compared ({exc})")
            continue
        used[base.run_id] = base
        rows.append({"method": label, **row})
        common = len(set(items_b) & set(items_r))
        if set(items_b) != set(items_r):
            notes.append(f"{label}: item sets differ; {common} in both "
                         f"(baseline {len(items_b)}, run {len(items_r)})")
        if row["n items"] < common:
            notes.append(f"{label}: {common - row['n items']} item(s) without a finite value left out")
    tab = pd.DataFrame.from_records(rows)
    cols = [*COLUMNS, *(RATIO_COLUMNS if "ratio" in tab else ()), "marker"]
    tab = tab.reindex(columns=cols)
    for b in used.values():
        proto = protocol_signature(b.provenance.get(metric) or {})["protocol"]
        where = f", experiment {b.experiment}" if b.experiment != runs[0].experiment else ""
        notes.insert(0, f"baseline: run {b.run_id} (seed {b.seed}, protocol {proto}{where})")
    notes.insert(0, f"diff = run - baseline on the items scored in both; 95% CI: paired bootstrap over items "
                    f"({n_resamples:,} resamples, seed {seed}, percentiles); McNemar: exact two-sided, "
                    f"binary outcomes only; '{WITHIN_NOISE}': the CI contains 0")
    return tab, notes + calib_footnotes(tab)


def paired_tables(records: Sequence[RunRecord], metrics: Sequence[str] | None = None,
                  n_resamples: int = N_RESAMPLES, seed: int = 0,
                  as_text: bool = False) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """``[(title, rows, notes)]``: one table per experiment, model and metric with per-item data.

    Args:
        records: the runs (any status; only ``ok`` ones are used).
        metrics: only these metric names (default: every metric with per-item data).
        n_resamples / seed: of the paired bootstrap (the same seed for every comparison).
        as_text: format the numbers (:func:`format_paired`).

    Returns:
        Tables whose rows may be empty when no run had a matching baseline (the notes say why).
    """
    ok = [r for r in records if r.status == "ok"]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in ok:
        if r.per_item:
            groups.setdefault((r.experiment or "", str((r.model or {}).get("name"))), []).append(r)
    out = []
    for (experiment, model), runs in sorted(groups.items()):
        names = sorted({m for r in runs for m in r.per_item if metrics is None or m in metrics})
        for metric in names:
            pool = [r for r in ok if str((r.model or {}).get("name")) == model and r.per_item.get(metric)
                    and (r.quantizer or {}).get("name") == "none"]
            block = _metric_block(metric, runs, pool, n_resamples, seed)
            if block is None:
                continue
            tab, notes = block
            title = f"{TITLE}: {metric} on {model} ({experiment or 'no experiment'})"
            out.append((title, format_paired(tab) if as_text else tab, notes))
    logger.debug("%d paired comparison table(s)", len(out))
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(float(value), spec)


def format_paired(tab: pd.DataFrame) -> pd.DataFrame:
    """Text cells: values and ratios 4 decimals, differences and CIs signed 4 decimals, p 3 significant
    digits (``-`` where not applicable, e.g. McNemar on non-binary outcomes)."""
    out = tab.copy().astype(object)
    specs = {"fp baseline": ".4f", "method value": ".4f", "diff": "+.4f", "95% CI low": "+.4f",
             "95% CI high": "+.4f", "McNemar p": "#.3g", "ratio": ".4f", "ratio CI low": ".4f",
             "ratio CI high": ".4f"}
    for col, spec in specs.items():
        if col in out:
            out[col] = [_fmt(v, spec) for v in tab[col]]
    if "n items" in out:
        out["n items"] = [str(int(v)) for v in tab["n items"]]
    return out
