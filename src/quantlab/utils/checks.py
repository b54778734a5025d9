"""Small validation helpers shared by the config dataclasses."""
from __future__ import annotations

from typing import Any, TypeGuard


def is_int(value: Any) -> TypeGuard[int]:
    """True for a real integer (``bool`` is excluded: YAML ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
