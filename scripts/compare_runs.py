"""Paired comparison of two recorded runs on one metric: B − A with a 95% paired bootstrap CI over the items
both scored (windows for perplexity, problems for pass@k), McNemar's exact p for binary outcomes.

    python scripts/compare_runs.py RUN_DIR_A RUN_DIR_B [--metric ppl/local_stdlib]

Each RUN_DIR is a run directory, or a directory whose newest ok run below it is taken.
The same statistics as the report's "Paired comparison vs the fp baseline" (quantlab.tracking.paired_table),
for any two runs, e.g. a fidelity default against its old behaviour.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantlab.tracking.paired_table import compare_items
from quantlab.tracking.record import RESULT_FILE, read_record


def _record(path: str):
    p = Path(path)
    found = [p / RESULT_FILE] if (p / RESULT_FILE).is_file() else sorted(p.rglob(RESULT_FILE))
    ok = [r for r in map(read_record, found) if r.status == "ok"]
    if not ok:
        raise SystemExit(f"compare_runs: {path}: no ok {RESULT_FILE} below it")
    return max(ok, key=lambda r: r.finished_at or "")  # a rerun: the newest ok record, as the report does


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metric", default="ppl/local_stdlib")
    args = ap.parse_args(argv)
    a, b = _record(args.a), _record(args.b)
    items = [(r.per_item or {}).get(args.metric) for r in (a, b)]
    if not all(items):
        raise SystemExit(f"compare_runs: no per-item values of {args.metric!r} in both runs")
    row = compare_items(items[0], items[1])
    labels = [(r.quant_summary or {}).get("method_label") or (r.quantizer or {}).get("name") for r in (a, b)]
    p = row["McNemar p"]
    print(f"{args.metric}: A {labels[0]} = {row['fp baseline']:.4f}, B {labels[1]} = {row['method value']:.4f}, "
          f"B - A = {row['diff']:+.4f} [95% CI {row['95% CI low']:+.4f}, {row['95% CI high']:+.4f}] over "
          f"{row['n items']} items{'' if p is None else f', McNemar p = {p:.3g}'}"
          f"{' (within noise)' if row['marker'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
