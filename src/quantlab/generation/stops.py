"""Stop sequences: where a completion ends."""
from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop sequence in ``text`` (``-1``: none)."""
    best = -1
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before the earliest stop sequence (Codex / bigcode-evaluation-harness convention:
    the stop sequence itself is dropped). Text without a stop sequence is returned unchanged."""
    i = first_stop(text, stops)
    return text if i == -1 else text[:i]
