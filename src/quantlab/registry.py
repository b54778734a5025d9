"""A tiny name -> object registry used for quantizers and evaluators, and the package scan that fills it."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from quantlab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps unique names to objects (usually classes). Duplicate names raise.

    Args:
        kind: what is registered, used in error messages and as the config key hint
            (e.g. ``"quantizer"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Look up ``name``; unknown names raise :class:`ConfigError` listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(self.kind, f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items


def import_submodules(package: str, path: list[str]) -> list[str]:
    """Import every module below ``package`` (its ``__path__`` is ``path``), so each one's registration
    decorator runs: a new method or evaluator is registered by existing, not by an import list.

    Modules and packages whose name starts with ``_`` are skipped. Returns the imported module names.
    """
    names = []
    for info in pkgutil.walk_packages(path, prefix=f"{package}."):
        if any(part.startswith("_") for part in info.name[len(package) + 1:].split(".")):
            continue
        importlib.import_module(info.name)
        names.append(info.name)
    return names
