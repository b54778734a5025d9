"""``python -m quantlab.report [DIR] [--out OUTDIR] [--experiment NAME] [--metrics a,b]``.

Prints the comparison tables of every run below DIR (default ``results``) and writes
``report.csv`` / ``report.md`` / ``report.parquet``; see :mod:`quantlab.tracking.report`.
"""
import sys

from quantlab.tracking.report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
