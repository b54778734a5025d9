"""The seed papers' published tables next to our runs: paper | ours | difference.

The tables are data (``quantlab/published/*.yaml``, one per paper table, transcribed from the papers with
their source: paper, arXiv id, table, seed-text line; tested against cells read by hand). Each cell names
a quantlab ``model``, ``method`` (quantizer), ``setting`` and ``metric``; the table names the protocol a
run must have followed (``protocol``: facts its metric provenance must carry, e.g. ``protocol: sqplus``).

A run *matches* a published cell when its model name, quantizer and setting (:func:`run_settings`) are the
cell's and it recorded the metric. Only when its provenance also follows the paper's protocol (and records
no ``protocol_deviations``) does its value go in the ``ours`` column, with the difference and whether the
paper's number lies inside the run's own 95% bootstrap interval over items; otherwise the value is shown
in ``ours, other protocol`` with that protocol named, never in the paper's column. Runs are the report's
pooled ones (one per variant and seed); several seeds of one variant give ``mean ± sd (n)``, and two
variants matching one cell get a line each, labelled by the knobs in which they differ. Every table also
says which of its published rows have no run yet, and tables with no matching run at all are listed once.
"""
from __future__ import annotations

import logging
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pandas as pd
import yaml

from quantlab.errors import DataError
from quantlab.tracking.record import RunRecord

logger = logging.getLogger(__name__)

PUBLISHED_DIR = Path(__file__).resolve().parents[1] / "published"
PAPER_NAMES = {"sqplus": "SmoothQuant+", "roy": "Roy et al. (PTQ study)", "llmqat": "LLM-QAT"}
_TABLE_KEYS = ("paper", "arxiv", "table", "seed_file", "seed_line", "caption", "scale", "protocol", "cells")
_CELL_KEYS = ("model", "method", "setting", "metric", "printed", "value")
_WAKV = re.compile(r"^\d+-\d+-\d+$")
CSR_AVG = "lm_eval/csr_avg"  # derived: mean of LLM-QAT's eight common-sense tasks
NOT_RUN_TITLE = "Published tables with no matching run yet"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class PublishedTable:
    """One paper table (see the module docstring); ``key`` is the file stem, e.g. ``sqplus_table1``."""

    key: str
    paper: str
    arxiv: str
    table: int
    seed_file: str
    seed_line: int
    caption: str
    scale: float
    protocol: dict[str, Any]
    cells: list[dict[str, Any]]
    page: int | None = None
    notes: str = ""

    @property
    def title(self) -> str:
        return f"{PAPER_NAMES.get(self.key.split('_')[0], self.paper)} Table {self.table}"

    @property
    def source(self) -> str:
        page = f", p. {self.page}" if self.page else ""
        return f"{self.paper} (arXiv {self.arxiv}), Table {self.table}{page}; seed text {self.seed_file}:{self.seed_line}"

    def value(self, cell: dict[str, Any]) -> float:
        """The cell in quantlab's unit (the printed number times the cell's or the table's ``scale``)."""
        return float(cell["value"]) * float(cell.get("scale", self.scale))


def load_published(directory: Path = PUBLISHED_DIR) -> list[PublishedTable]:
    """Every ``*.yaml`` table in ``directory``, sorted by file name.

    Raises:
        DataError: a file is not valid YAML or lacks a key (the message names the file and key).
    """
    out = []
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            d = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # safe; C speed (1,126 cells)
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: cannot read published table: {exc}") from exc
        missing = [k for k in _TABLE_KEYS if not isinstance(d, dict) or k not in d]
        if missing:
            raise DataError(f"{path}: published table lacks {missing}")
        for i, cell in enumerate(d["cells"] or []):
            lacking = [k for k in _CELL_KEYS if k not in cell]
            if lacking:
                raise DataError(f"{path}: cells[{i}] lacks {lacking}")
        fields = {k: d.get(k) for k in (*_TABLE_KEYS, "page", "notes") if d.get(k) is not None}
        fields["protocol"] = dict(fields.get("protocol") or {})
        out.append(PublishedTable(key=path.stem, **fields))
    return out


# ----------------------------------------------------------------------------- matching


def run_settings(r: RunRecord) -> set[str]:
    """The published ``setting`` strings a run can match, from its recorded method label.

    ``fp16``/``bf16``/``fp32`` for the baseline (``16-16-16`` too at 16 bits); the bitsandbytes mode
    (``nf4-dq``); the W-A-KV string plus the label's non-paper choices (``4-8-4``, ``4-8-4 a:lsq``) when
    activations or the KV cache are quantized; else the weight format (``w4g128a``).
    """
    label = str((r.quant_summary or {}).get("method_label") or "")
    tokens = label.split()
    if not tokens:
        return set()
    if (r.quantizer or {}).get("name") == "none" and len(tokens) == 1:
        wakv = str((r.quant_summary or {}).get("wakv") or "16-16-16")
        if wakv != "16-16-16":  # the baseline with quantized activations / KV cache (16-A-KV)
            return {wakv}
        return {tokens[0], "16-16-16"} if tokens[0] in ("fp16", "bf16") else {tokens[0]}
    if tokens[0].startswith("bnb."):  # the mode, and any non-paper choice after it (compute:fp16)
        return {" ".join([tokens[0][4:], *tokens[1:]])}
    rest = tokens[2:]
    if rest and _WAKV.match(rest[0]) and not rest[0].endswith("-16-16"):
        return {" ".join(rest)}
    return {tokens[1]} if len(tokens) > 1 else set()


def metric_value(r: RunRecord, metric: str) -> float | None:
    """``r``'s value of ``metric`` (the derived :data:`CSR_AVG` from its eight task accuracies)."""
    if metric == CSR_AVG:
        from quantlab.tracking.llmqat_tables import CSR_TASKS

        vals = [(r.metrics or {}).get(f"lm_eval/{t}/{m}") for t, m, _ in CSR_TASKS]
        return None if any(v is None for v in vals) else sum(cast(list[float], vals)) / len(vals)
    v = (r.metrics or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def follows(r: RunRecord, metric: str, protocol: dict[str, Any]) -> tuple[bool, str]:
    """Did ``r`` measure ``metric`` under the paper's ``protocol``? ``(yes, its protocol in words)``."""
    if metric == CSR_AVG:
        from quantlab.tracking.llmqat_tables import CSR_TASKS

        t, m, _ = CSR_TASKS[0]
        metric = f"lm_eval/{t}/{m}"
    prov = (r.provenance or {}).get(metric) or {}
    name = prov.get("protocol") or prov.get("ppl_protocol") or prov.get("prompt_style") or "unrecorded"
    bad = [k for k, v in protocol.items() if prov.get(k) != v]
    if prov.get("protocol_deviations"):
        return False, f"{name} (deviations: {prov['protocol_deviations']})"
    return not bad, str(name) if not bad else ", ".join(f"{k}={prov.get(k)}" for k in bad)


def _own_ci(r: RunRecord, metric: str) -> tuple[float, float] | None:
    from quantlab.metrics.paired import bootstrap_value

    items = (r.per_item or {}).get(metric)
    if not items:
        return None
    try:
        ci = bootstrap_value(list(items.values()))
    except (ValueError, TypeError):
        return None
    return ci.low, ci.high


@dataclass
class _Line:
    values: list[float] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _ours(line: _Line, metric: str, paper: float) -> dict[str, str]:
    vals = line.values
    mean = statistics.fmean(vals)
    cell = _fmt(mean) if len(vals) == 1 else f"{_fmt(mean)} ± {_fmt(statistics.stdev(vals))} (n={len(vals)})"
    out = {"ours": cell, "ours - paper": f"{mean - paper:+.4f}", "ours 95% CI": "-", "paper in CI": "-"}
    ci = _own_ci(line.runs[0], metric) if len(vals) == 1 else None
    if ci:
        out["ours 95% CI"] = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
        out["paper in CI"] = "yes" if ci[0] <= paper <= ci[1] else "no"
    return out


def compare_table(table: PublishedTable, records: Sequence[RunRecord]) -> tuple[pd.DataFrame, list[str]]:
    """``(rows, notes)`` of one paper table against ``records`` (empty rows when none matches)."""
    by_key: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status != "ok":
            continue
        for s in run_settings(r):
            by_key[((r.model or {}).get("name"), (r.quantizer or {}).get("name"), s)].append(r)
    rows: list[dict[str, Any]] = []
    unmatched: dict[tuple, str] = {}
    for cell in table.cells:
        key = (cell["model"], cell["method"], cell["setting"])
        paper = table.value(cell)
        lines: dict[tuple, _Line] = defaultdict(_Line)
        for r in by_key.get(key, []):
            v = metric_value(r, cell["metric"])
            if v is None:
                continue
            ok, proto = follows(r, cell["metric"], table.protocol)
            qs = r.quant_summary or {}
            line = lines[(str(qs.get("display_label") or qs.get("method_label")), ok, proto)]
            line.values.append(v)
            line.runs.append(r)
        if not lines:
            unmatched.setdefault(key, f"{cell['model']} {cell.get('row_label', cell['method'])} ({cell['setting']})")
            continue
        for (label, ok, proto), line in lines.items():
            row = {"model": cell["model"], "paper row": cell.get("row_label", cell["method"]),
                   "column": cell.get("column_label", cell["metric"]), "paper": _fmt(paper)}
            if ok:
                row.update(_ours(line, cell["metric"], paper))
                row["ours, other protocol"] = "-"
            else:
                mean = statistics.fmean(line.values)
                row.update({"ours": "-", "ours - paper": "-", "ours 95% CI": "-", "paper in CI": "-",
                            "ours, other protocol": f"{_fmt(mean)} ({proto}; n={len(line.values)})"})
            row["run"] = label
            rows.append(row)
    notes = [f"source: {table.source}"]
    if rows:
        want = ", ".join(f"{k}={v}" for k, v in table.protocol.items()) or "none recorded"
        notes.append(f"paper's protocol: {want}; a run under another protocol is shown only in "
                     "'ours, other protocol', never in the paper's column")
        missing = sorted(set(unmatched.values()))
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
            notes.append(f"no run yet for {len(missing)} published row(s): {shown}")
    return pd.DataFrame.from_records(rows), notes


def published_tables(records: Sequence[RunRecord], tables: Sequence[PublishedTable] | None = None
                     ) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(title, frame, notes) per paper table that some run matches, then one table of those none does."""
    tables = load_published() if tables is None else tables
    out, idle = [], []
    for t in tables:
        frame, notes = compare_table(t, records)
        if frame.empty:
            rows = {(c["model"], c["method"], c["setting"]) for c in t.cells}
            idle.append({"table": t.title, "published rows": len(rows), "cells": len(t.cells),
                         "source": f"arXiv {t.arxiv}, seed text {t.seed_file}:{t.seed_line}"})
        else:
            out.append((f"Published vs ours: {t.title}", frame, notes))
    if idle:
        out.append((NOT_RUN_TITLE, pd.DataFrame.from_records(idle),
                    ["python -m quantlab +exp=<the paper's preset> fills them (conf/exp)"]))
    return out
