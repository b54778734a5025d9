"""Saving and re-applying what a method found (codes, scales, clips, smoothing factors).

Artifacts are one ``safetensors`` file per run (``artifacts.safetensors`` in the run directory).
Its metadata names the method and holds the method's config as JSON, so re-applying the file with
another method, or to a model whose layers do not match, fails with a clear error instead of
producing a silently different model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantlab.errors import ConfigError

ARTIFACTS_FILE = "artifacts.safetensors"
KEY = "quantizer.load_artifacts"


def save_artifacts(path: Path, tensors: dict[str, torch.Tensor], method: str, config: dict[str, Any]) -> Path:
    """Write ``tensors`` with the method name and config in the file's metadata (atomic rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    meta = {"quantlab_method": method, "config": json.dumps(config, sort_keys=True, default=str)}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_artifacts(path: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artifact file written for ``method``.

    ``path`` may be the file or a run directory containing ``artifacts.safetensors``.

    Returns:
        ``(tensors, saved_config)``.

    Raises:
        ConfigError: (key ``quantizer.load_artifacts``) if the file is missing, unreadable, or was
            written by another method.
    """
    from safetensors import safe_open

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ARTIFACTS_FILE
    if not p.is_file():
        raise ConfigError(KEY, f"artifact file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(KEY, f"cannot read artifact file {p}: {exc}") from None
    saved = meta.get("quantlab_method")
    if saved != method:
        raise ConfigError(KEY, f"{p} holds artifacts of method {saved!r}, not {method!r}")
    return tensors, json.loads(meta.get("config", "{}"))


def require(tensors: dict[str, torch.Tensor], key: str, source: str | Path) -> torch.Tensor:
    """``tensors[key]`` or a :class:`ConfigError` saying the artifact file does not fit the model."""
    try:
        return tensors[key]
    except KeyError:
        raise ConfigError(KEY, f"{source} has no entry {key!r}: it was made for a different model or layer selection") from None
