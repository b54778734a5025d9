"""User-facing errors.

Every problem a user can fix (a bad config value, a missing file, no hub access) is raised as a
:class:`QuantlabError`. The entry point turns it into one clear line on stderr, a ``status=failed``
record and a non-zero exit, instead of a traceback.
"""
from __future__ import annotations


class QuantlabError(Exception):
    """An error the user can act on; its message is shown as-is, without a traceback."""


class ConfigError(QuantlabError, ValueError):
    """A configuration value is invalid.

    Args:
        key: dotted config key that holds the offending value, e.g. ``quantizer.format.bits``.
        message: what is wrong and, where possible, how to fix it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(QuantlabError):
    """A data source (text file, dataset, model folder) cannot be read or is unusable."""


def find_quantlab_error(exc: BaseException) -> QuantlabError | None:
    """Return the first :class:`QuantlabError` in ``exc``'s cause/context chain (Hydra wraps them)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, QuantlabError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
