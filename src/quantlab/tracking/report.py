"""Collect ``result.json`` records below a directory and render the comparison table.

``python -m quantlab.report [DIR] [--out OUTDIR] [--experiment NAME] [--metrics a,b]`` prints one
table per experiment (then the paper-shaped tables and the paired comparisons vs the fp baseline,
:mod:`quantlab.tracking.paired_table`) and writes ``report.csv`` (every flat column), ``report.md`` (the
same tables) and, when pyarrow is installed, ``report.parquet``.

Killed or still-running runs (a Hydra run dir with ``.hydra/`` but no ``result.json``) appear as
``status = incomplete`` rows: they are never silently dropped and never shown as successes.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import numbers
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from quantlab.tracking.cells import CALIB_FOOTNOTE, DAGGER, calib_footnotes, calibrated_on_eval
from quantlab.tracking.paired_table import paired_tables
from quantlab.tracking.paper_tables import paper_tables
from quantlab.tracking.published import published_tables
from quantlab.tracking.record import RunRecord, write_text_atomic
from quantlab.tracking.runset import (
    SUPERSEDED_TITLE,
    Resolved,
    collect,
    label_variants,
    pooled,
    resolve,
    superseded_frame,
)
from quantlab.tracking.sampling_report import sampling_plots

logger = logging.getLogger(__name__)

ID_COLUMNS = ("experiment", "model", "quantizer", "format", "wakv", "bits_per_weight", "seed")
TAIL_COLUMNS = ("quant_time_s", "wall_s", "peak_rss_gb", "status", "run_id", "model_note", "method", "output_dir",
                "calibrated_on_eval_set", "variant")  # the last one: shown as a dagger on the quantizer
_TIME_COLUMNS = ("quant_time_s", "wall_s")
_GB_COLUMNS = ("peak_rss_gb", "peak_cuda_gb")
_STATUS_STYLE = {"failed": "red", "incomplete": "yellow"}
MISSING = "-"


# ----------------------------------------------------------------------------- collect


def to_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per record (:meth:`RunRecord.flat`), columns in first-seen order."""
    return pd.DataFrame.from_records([r.flat() for r in records])


# ----------------------------------------------------------------------------- summary


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Metric columns of a flat frame: every column whose name contains ``/``, sorted."""
    return sorted(c for c in df.columns if "/" in str(c))


def _select_metrics(df: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    available = metric_columns(df)
    if metrics is None:
        return available
    chosen: list[str] = []
    unknown: list[str] = []
    for m in metrics:
        hits = [c for c in available if c == m or c.startswith(m.rstrip("/") + "/")]
        if not hits:
            unknown.append(m)
        chosen.extend(h for h in hits if h not in chosen)
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {available}")
    return chosen


def summary_table(df: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """The comparison table.

    Columns: experiment, model, quantizer, format, bits_per_weight, seed, the metric columns
    (``metrics`` if given, each an exact name or a prefix such as ``ppl``; default: all), then
    quant_time_s, wall_s, peak_rss_gb, status, run_id. Rows are sorted by experiment, model,
    quantizer (``none`` first), format, seed, run_id.

    Raises:
        ValueError: a requested metric matches no column.
    """
    cols = [*ID_COLUMNS, *_select_metrics(df, metrics), *TAIL_COLUMNS]
    out = df.reindex(columns=cols)
    if out.empty:
        return out.reset_index(drop=True)
    order = out.assign(_not_none=out["quantizer"] != "none")
    order = order.sort_values(
        ["experiment", "model", "_not_none", "quantizer", "format", "wakv", "seed", "run_id"],
        na_position="last",
        kind="stable",
    )
    return order.drop(columns="_not_none").reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def format_cell(column: str, value: Any) -> str:
    """Display string of one cell: metrics 4 decimals, times 1 decimal, GiB 2 decimals, bits/weight exact."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isinf(v):
            return str(v)
        if column in _TIME_COLUMNS:
            return f"{v:.1f}"
        if column in _GB_COLUMNS:
            return f"{v:.2f}"
        if column == "bits_per_weight":
            return f"{v:.8f}".rstrip("0").rstrip(".")  # exact for power-of-two group sizes
        if "/" in column:
            return f"{v:.4e}" if abs(v) >= 1e6 else f"{v:.4f}"
        if v.is_integer():
            return str(int(v))
        return f"{v:.4g}"
    return str(value)


def _experiment_tables(summary: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, list[str]]]:
    """(experiment, rows, notes) per experiment, for printing.

    Metric columns that are empty in that experiment are dropped, and so are ``seed`` when every row
    has the same seed and ``run_id`` (both stay in report.csv). Model caveats (e.g. the demo model's
    dequantized-GGUF "fp" weights) become footnotes: ``"<model>: <note>"``. Runs calibrated on the
    evaluation set get ``†`` after their quantizer and the table gets :data:`CALIB_FOOTNOTE`.
    """
    for name, sub in summary.groupby(summary["experiment"].fillna(""), sort=False, dropna=False):
        empty = [c for c in metric_columns(sub) if sub[c].isna().all()]
        quiet = [c for c in ("run_id", "model_note", "method", "output_dir", "calibrated_on_eval_set", "variant")
                 if c in sub]
        if "method" in sub and sub["method"].astype(str).str.contains(" [", regex=False).any():
            quiet.remove("method")  # variants that share a label: the label names the knobs that differ
        if "seed" in sub and sub["seed"].nunique() <= 1:
            quiet.append("seed")
        if "wakv" in sub and not sub["wakv"].dropna().astype(str).map(_quantizes_act_or_kv).any():
            quiet.append("wakv")  # weight-only runs: the format column says it all
        notes: list[str] = []
        if "model_note" in sub:
            pairs = sub[["model", "model_note"]].dropna().drop_duplicates()
            notes = [f"{m}: {n}" for m, n in pairs.itertuples(index=False, name=None)]
        flagged = calibrated_on_eval(sub)
        if flagged.any():
            marked = sub["quantizer"].astype(str) + DAGGER
            sub = sub.assign(quantizer=sub["quantizer"].where(~flagged, marked))
            notes.append(CALIB_FOOTNOTE)
        yield str(name), sub.drop(columns=["experiment", *empty, *quiet]), notes


def _quantizes_act_or_kv(wakv: str) -> bool:
    """``4-8-4`` -> True, ``4-16-16`` -> False (W-A-KV of a weight-only run)."""
    return any(part != "16" for part in wakv.split("-")[1:])


def _caption(rows: pd.DataFrame) -> str | None:
    if "status" not in rows:
        return None
    counts = rows["status"].fillna("?").value_counts()
    parts = [f"{n} {status}" for status, n in counts.items()]
    return f"{len(rows)} run(s): " + ", ".join(parts)


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def render_markdown(rows: pd.DataFrame) -> str:
    """GitHub-flavoured markdown table of ``rows`` (numeric columns right-aligned)."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in rows.columns]
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |",
             "|" + "|".join("---:" if _is_numeric(rows[c]) else "---" for c in cols) + "|"]
    for rec in rows.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(esc(format_cell(c, v)) for c, v in zip(cols, rec)) + " |")
    return "\n".join(lines) + "\n"


def _note(note: str, word: str = "note") -> str:
    """A table's note as printed: ``note (...)``; the calibration footnote (``† ...``) verbatim."""
    return note if note.startswith(DAGGER) else f"{word} ({note})"


def _more_tables(summary: pd.DataFrame, records: Sequence[RunRecord] | None,
                 footer: pd.DataFrame | None = None) -> list[tuple[str, Any, list]]:
    """(title, text frame, notes) of the paper-shaped tables, the paired comparisons and the published
    numbers next to ours (:mod:`quantlab.tracking.published`), over the ``records`` with each (variant, seed)
    once (:func:`~quantlab.tracking.runset.pooled`; without records: ``summary``), then the footer of
    superseded/skipped records."""
    metrics = metric_columns(summary)
    pool = pooled(records) if records else None
    shaped = summary_table(to_frame(pool)).reindex(columns=summary.columns) if pool else summary
    out = [(t, tab, calib_footnotes(tab)) for t, tab in paper_tables(shaped, as_text=True)]
    if pool:
        out += paired_tables(pool, metrics=metrics, as_text=True)
        out += published_tables(pool)
    if footer is not None and not footer.empty:
        out.append((SUPERSEDED_TITLE, footer, ["a rerun of the same variant and seed counts once: the newest ok "
                                               "record is the row; these records are in no cell"]))
    return out


def _markdown_report(summary: pd.DataFrame, records: Sequence[RunRecord] | None = None,
                     footer: pd.DataFrame | None = None) -> str:
    parts = ["# quantlab report\n"]
    for name, rows, notes in _experiment_tables(summary):
        parts += [f"\n## {name or '(no experiment)'}\n", f"\n{_caption(rows)}\n\n", render_markdown(rows)]
        parts += [f"\n{_note(n, 'Note')}\n" for n in notes]
    for title, tab, notes in _more_tables(summary, records, footer):
        parts += [f"\n## {title}\n\n", render_markdown(tab)]
        parts += [f"\n{_note(n, 'Note')}\n" for n in notes]
    parts.append("\n`peak_rss_gb` is the peak RSS of the whole process (in a multirun it includes earlier jobs).\n")
    return "".join(parts)


def _rich_table(name: str, rows: pd.DataFrame):
    """(table, natural width): the width at which no column is squeezed, folded or cropped."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=name or "(no experiment)", caption=_caption(rows))
    cells = {c: [format_cell(str(c), v) for v in rows[c]] for c in rows.columns}
    width = 1
    for c in rows.columns:
        col_w = max([len(str(c)), *(len(s) for s in cells[c])])
        width += col_w + 3  # padding (2) + border (1)
        table.add_column(str(c), justify="right" if _is_numeric(rows[c]) else "left", no_wrap=True)
    statuses: list[Any] = list(rows["status"]) if "status" in rows else [None] * len(rows)
    for i, status in enumerate(statuses):
        table.add_row(*(Text(cells[c][i]) for c in rows.columns), style=_STATUS_STYLE.get(status))  # no markup
    return table, width


def print_tables(summary: pd.DataFrame, console=None, records: Sequence[RunRecord] | None = None,
                 footer: pd.DataFrame | None = None) -> None:
    """Print one rich table per experiment of a :func:`summary_table` frame, then the paper-shaped tables
    and, when the ``records`` are given, the paired comparisons vs the fp baseline; then the ``footer``
    (:func:`~quantlab.tracking.runset.superseded_frame`)."""
    from rich.console import Console

    console = console or Console()
    for title, rows, notes in [*_experiment_tables(summary), *_more_tables(summary, records, footer)]:
        table, width = _rich_table(title, rows)
        # Print at the table's natural width even on a narrow/non-tty console: rich would otherwise
        # squeeze or crop columns, and a cropped status or metric column is worse than a long line.
        saved = console.width
        console.width = max(width, saved)
        try:
            console.print(table, crop=False)
            for note in notes:
                console.print(_note(note), soft_wrap=True, markup=False, highlight=False)
        finally:
            console.width = saved


def print_summary(root: Path, console=None, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Collect the records below ``root`` (a run dir or a sweep dir) and print their tables.

    Returns:
        The summary frame (empty when ``root`` holds no records; nothing is printed then).
    """
    records, resolved = gather(Path(root))
    df = to_frame(records)
    if df.empty:
        logger.info("no run records below %s", root)
        return df
    summary = summary_table(df, metrics)
    print_tables(summary, console, records, superseded_frame(resolved))
    return summary


def gather(root: Path, experiment: str | None = None) -> tuple[list[RunRecord], Resolved]:
    """The records below ``root`` that are table rows (one per experiment, variant and seed; labels that
    tell variants apart, :mod:`quantlab.tracking.runset`) and the resolution (with the superseded ones)."""
    records = collect(root) if Path(root).is_dir() else []
    if experiment is not None:
        records = [r for r in records if r.experiment == experiment]
    resolved = resolve(records)
    return label_variants(resolved.rows), resolved


# ----------------------------------------------------------------------------- outputs


def _write_parquet(df: pd.DataFrame, path: Path) -> bool:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return True
    except (ValueError, TypeError, NotImplementedError) as exc:  # pyarrow type conversion problems
        logger.warning("report.parquet not written (%s: %s); report.csv has the same rows", type(exc).__name__, exc)
        return False
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(df: pd.DataFrame, out_dir: Path, metrics: Sequence[str] | None = None,
                  records: Sequence[RunRecord] | None = None, footer: pd.DataFrame | None = None) -> list[Path]:
    """Write ``report.csv`` (full flat frame), ``report.md`` (the printed tables; the paired comparisons
    when ``records`` are given), ``report.parquet`` (if pyarrow) and the sampling-study plots (PNG, one
    per experiment/model/axis, when runs have sweeps).

    Returns:
        The paths actually written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.csv", out_dir / "report.md"]
    write_text_atomic(written[0], df.to_csv(index=False))
    write_text_atomic(written[1], _markdown_report(summary_table(df, metrics), records, footer))
    if importlib.util.find_spec("pyarrow") is not None and _write_parquet(df, out_dir / "report.parquet"):
        written.append(out_dir / "report.parquet")
    written += sampling_plots(summary_table(df, metrics), out_dir)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantlab.report", description=__doc__.split("\n")[0])
    p.add_argument("dir", nargs="?", default="results", help="directory searched for result.json (default: results)")
    p.add_argument("--out", default=None, help="where report.{csv,md,parquet} go (default: DIR)")
    p.add_argument("--experiment", default=None, help="only this experiment")
    p.add_argument("--metrics", default=None, help="comma-separated metric names or prefixes (default: all)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit code (0 ok, 1 no records, 2 bad ``--metrics``)."""
    from rich.console import Console

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.dir)
    records, resolved = gather(root, args.experiment)
    if not records:
        what = f" for experiment {args.experiment!r}" if args.experiment is not None else ""
        sys.stderr.write(f"quantlab.report: no run records{what} under {root}\n")
        return 1
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    df = to_frame(records)
    try:
        summary = summary_table(df, metrics)
    except ValueError as exc:
        sys.stderr.write(f"quantlab.report: --metrics: {exc}\n")
        return 2
    console = Console()
    footer = superseded_frame(resolved)
    print_tables(summary, console, records, footer)
    for path in write_outputs(df, Path(args.out) if args.out else root, metrics, records, footer):
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)
    return 0
