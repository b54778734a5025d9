"""Duplicate content words of a generation (Roy, "Understanding the Impact of Post-Training
Quantization on Large Language Models", arXiv 2309.05210, sections 3.3-4: "the number of duplicate
content words", content words = the words left after removing stop words).

The paper publishes no code, so the definition is explicit and recorded with every value
(:func:`definition`):

1. only the generated continuation is scored (never the prompt);
2. words = matches of ``[A-Za-z]+(?:'[A-Za-z]+)?`` (ASCII letters, one inner apostrophe), lowercased;
3. content words = words not in scikit-learn's ``ENGLISH_STOP_WORDS`` (318 words; the scikit-learn
   version is pinned in ``pyproject.toml`` and recorded) and at least ``min_len`` characters long;
4. ``duplicates = n_content - n_unique_content`` (every occurrence after a word's first one).

The length floor of step 3 is not in the paper, which removes stop words only: ``min_len`` (default
2) is quantlab's choice. It drops the single letters that are not stop words (all but "a" and "i"):
variable names such as "x", list markers, and the "s" of an "it's" typed with a typographic
apostrophe (U+2019), which the regex splits off. ``min_len=1`` (``eval.sampling.min_len=1``) keeps
them: the paper's definition, with no length floor.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

WORD_PATTERN = r"[A-Za-z]+(?:'[A-Za-z]+)?"
_WORD_RE = re.compile(WORD_PATTERN)
MIN_LEN = 2  # quantlab's choice, not the paper's (module docstring); 1 = no length floor


@lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list (a frozenset of 318 lowercase words in 1.9)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def definition(min_len: int = MIN_LEN) -> dict[str, Any]:
    """The metric's parameters, recorded next to every value."""
    import sklearn

    return {
        "metric": "duplicate_content_words",
        "scope": "continuation only",
        "word_regex": WORD_PATTERN,
        "lowercase": True,
        "stop_words": "sklearn.feature_extraction.text.ENGLISH_STOP_WORDS",
        "stop_words_version": f"scikit-learn {sklearn.__version__}",
        "n_stop_words": len(stop_words()),
        "min_len": min_len,
        "duplicates": "n_content - n_unique_content",
    }


@dataclass(frozen=True)
class DuplicateStats:
    """Counts for one text.

    Attributes:
        n_words: all word tokens.
        n_content: content words (stop words and words shorter than ``min_len`` removed).
        n_unique: distinct content words.
        duplicates: ``n_content - n_unique`` (occurrences beyond each word's first).
        n_repeated_types: distinct content words that occur more than once.
    """

    n_words: int
    n_content: int
    n_unique: int
    duplicates: int
    n_repeated_types: int

    @property
    def duplicate_ratio(self) -> float:
        """``duplicates / n_content`` (0 for a text without content words)."""
        return self.duplicates / self.n_content if self.n_content else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duplicate_ratio": self.duplicate_ratio}


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` (see the module docstring)."""
    return [w.lower() for w in _WORD_RE.findall(text)]


def content_words(text: str, min_len: int = MIN_LEN, stops: Iterable[str] | None = None) -> list[str]:
    """The content words of ``text`` in order (stop words and short words removed)."""
    stop = stop_words() if stops is None else frozenset(stops)
    return [w for w in words(text) if len(w) >= min_len and w not in stop]


def duplicate_content_words(text: str, min_len: int = MIN_LEN, stops: Iterable[str] | None = None) -> DuplicateStats:
    """Count the duplicate content words of one generated continuation."""
    all_words = words(text)
    stop = stop_words() if stops is None else frozenset(stops)
    content = [w for w in all_words if len(w) >= min_len and w not in stop]
    counts = Counter(content)
    return DuplicateStats(
        n_words=len(all_words),
        n_content=len(content),
        n_unique=len(counts),
        duplicates=len(content) - len(counts),
        n_repeated_types=sum(1 for c in counts.values() if c > 1),
    )
