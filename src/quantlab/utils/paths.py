"""Filesystem locations: the model cache and the results tree."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """quantlab's cache (demo model, converted checkpoints): ``$QUANTLAB_CACHE`` or ``~/.cache/quantlab``.

    This is the one place where library code reads an environment variable; it is documented in the
    README and recorded with every run that loads from the cache.
    """
    env = os.environ.get("QUANTLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantlab"


def results_root() -> Path:
    """Root of the results tree: ``$QUANTLAB_RESULTS`` or ``./results`` (as in ``conf/hydra/default.yaml``)."""
    env = os.environ.get("QUANTLAB_RESULTS")
    return Path(env).expanduser() if env else Path("results")
