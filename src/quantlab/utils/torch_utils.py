"""Device/dtype helpers and seeding."""
from __future__ import annotations

import random
from typing import cast

import numpy as np
import torch
from torch import nn

from quantlab.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(name: str, key: str = "model.dtype") -> torch.dtype | str:
    """Map a dtype name to ``torch.dtype`` (``"auto"`` passes through for ``from_pretrained``)."""
    if name == "auto":
        return "auto"
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(key, f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or auto") from None


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, f"{name!r} requested but CUDA is not available (use {key.split('.')[0]}.device=cpu)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    """``model.get_submodule(name)``, typed as the Linear that it is (not checked)."""
    return cast(nn.Linear, model.get_submodule(name))


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device
