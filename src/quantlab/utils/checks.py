"""Small validation helpers shared by the config dataclasses."""
from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """True for a real integer (``bool`` is excluded: YAML ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
