"""The sampling grid (temperature x top_k x max_new_tokens), its seeds and its generation calls.

Seeding: every (temperature, top_k) cell draws from ``cell_seed(seed, temperature, top_k)``, and each
prompt from its own generator seeded by (cell seed, prompt) (:func:`quantlab.generation.hf.sample_seed`).
The seed does **not** depend on ``max_new_tokens``: sampling is causal, so the completion generated
with budget 50 is exactly the first 50 tokens of the one generated with budget 500 (until EOS, which
ends both). Hence two equivalent plans:

* ``nested`` (default): one generation call per (temperature, top_k) at the largest budget, cut to
  every smaller budget (5.5x fewer tokens for the paper's 50..500 grid);
* independent: one call per (temperature, top_k, max_new_tokens), the paper's literal protocol and
  the one to use for per-budget tokens/s. Same texts (tested), more compute.

Across budgets the generations are therefore common-random-number samples (differences between
budgets are not blurred by independent draws); across cells and prompts they are independent.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from quantlab.errors import ConfigError
from quantlab.utils.checks import is_int

#: Roy (2023) section 3.3
PAPER_MAX_NEW_TOKENS = tuple(range(50, 501, 50))
PAPER_TEMPERATURES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
PAPER_TOP_KS = (1, 5, 10, 20, 50, 100, 200)


def cell_seed(seed: int, temperature: float, top_k: int) -> int:
    """Seed of one (temperature, top_k) cell (independent of the budget, see the module docstring)."""
    digest = hashlib.sha256(f"{int(seed)}|T={float(temperature)!r}|k={int(top_k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Call:
    """One generation call: every prompt at one temperature and top_k, up to ``budget`` new tokens;
    its completions serve the budgets ``serves`` (just ``budget`` unless nested)."""

    temperature: float
    top_k: int
    budget: int
    serves: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"T={float(self.temperature)!r}|k={int(self.top_k)}|m={int(self.budget)}"


def _values(values: Sequence, key: str, kind: type, minimum: float, strict: bool) -> tuple:
    try:
        items = tuple(values)
    except TypeError:
        raise ConfigError(key, f"must be a list, got {values!r}") from None
    ok = all((is_int(v) if kind is int else isinstance(v, (int, float)) and not isinstance(v, bool)) for v in items)
    if not items or not ok or any(v < minimum or (strict and v == minimum) for v in items):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(key, f"must be a non-empty list of {kind.__name__}s {bound}, got {list(items)!r}")
    if len(set(items)) != len(items):
        raise ConfigError(key, f"has repeated values: {list(items)!r}")
    return tuple(sorted(kind(v) for v in items))


@dataclass(frozen=True)
class SamplingGrid:
    """Validated grid values (sorted) and the plan of generation calls."""

    temperatures: tuple[float, ...]
    top_ks: tuple[int, ...]
    max_new_tokens: tuple[int, ...]
    nested: bool = True

    @classmethod
    def build(cls, temperatures: Sequence, top_ks: Sequence, max_new_tokens: Sequence, nested: bool,
              key: str = "eval.sampling") -> SamplingGrid:
        return cls(
            temperatures=_values(temperatures, f"{key}.temperatures", float, 0.0, strict=True),
            top_ks=_values(top_ks, f"{key}.top_ks", int, 0, strict=False),
            max_new_tokens=_values(max_new_tokens, f"{key}.max_new_tokens", int, 1, strict=False),
            nested=bool(nested),
        )

    def calls(self) -> list[Call]:
        """Generation calls in a fixed order (temperature, then top_k, then budget)."""
        out: list[Call] = []
        for t in self.temperatures:
            for k in self.top_ks:
                if self.nested:
                    out.append(Call(t, k, max(self.max_new_tokens), self.max_new_tokens))
                else:
                    out.extend(Call(t, k, m, (m,)) for m in self.max_new_tokens)
        return out

    @property
    def n_cells(self) -> int:
        return len(self.temperatures) * len(self.top_ks) * len(self.max_new_tokens)
