"""BabelCode / MultiPL-E HumanEval in Python, Java, Go and C++ (SmoothQuant+ paper, Table 2).

Rows come from :mod:`quantlab.evals.code.babelcode` (``bc-humaneval``: per-test ``TEST-<id>...PASSED``
judging) or :mod:`quantlab.evals.code.multipl_e` (pass = exit code 0). Generation, sandboxing,
resume and pass@k are :class:`~quantlab.evals.code.runner.CodeEval`'s; pass@k is reported per
language and as the unweighted mean over languages (the paper's "average" column).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from quantlab.errors import ConfigError
from quantlab.evals.base import register_evaluator
from quantlab.evals.code.problem import CodeProblem
from quantlab.evals.code.runner import CodeEval

FORMATS: tuple[str, ...] = ("babelcode", "multipl_e")
LANGUAGES: tuple[str, ...] = ("python", "java", "go", "cpp")


@register_evaluator("babelcode")
@dataclass(frozen=True)
class MultilingualCodeEval(CodeEval):
    """pass@k per language on BabelCode (or MultiPL-E) HumanEval.

    Attributes:
        source: a local ``.jsonl(.gz)`` of dataset rows, or ``hub`` to fetch the dataset's files.
        format: ``babelcode`` (bc-humaneval rows) or ``multipl_e`` (MultiPL-E rows).
        languages: languages to evaluate (``python``, ``java``, ``go``, ``cpp``).
        limit: the first ``limit`` problems *per language*.
        javatuples_jar: path of ``javatuples-1.2.jar`` for MultiPL-E Java problems that use tuples
            (without it those problems fail with a message saying so).
    """

    source: str = "hub"
    format: str = "babelcode"
    languages: tuple[str, ...] = LANGUAGES
    javatuples_jar: str | None = None

    per_language: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.languages, list):
            object.__setattr__(self, "languages", tuple(self.languages))
        key = f"eval.{self.name or self.kind}"
        if self.format not in FORMATS:
            raise ConfigError(f"{key}.format", f"must be one of {list(FORMATS)}, got {self.format!r}")
        bad = [x for x in self.languages if x not in LANGUAGES]
        if not self.languages or bad:
            raise ConfigError(f"{key}.languages", f"unknown {bad or 'empty list'}; choose from {list(LANGUAGES)}")
        super().__post_init__()
        protocol = self.prompt_protocol()
        for lang in self.languages:  # instruct / sqplus are HumanEval (Python) protocols
            protocol.check_language(lang)

    def load_problems(self) -> tuple[list[CodeProblem], dict[str, Any]]:
        if self.format == "babelcode":
            from quantlab.evals.code.babelcode import load_babelcode

            problems: list[CodeProblem] = list(load_babelcode(self.source, languages=self.languages, limit=None))
        else:
            from quantlab.evals.code.multipl_e import load_multipl_e

            problems = list(load_multipl_e(self.source, languages=self.languages, limit=None,
                                           javatuples_jar=self.javatuples_jar))
        per_lang: dict[str, list[CodeProblem]] = {}
        for p in problems:
            per_lang.setdefault(p.language, []).append(p)
        missing = [x for x in self.languages if x not in per_lang]
        if missing:
            raise ConfigError(f"eval.{self.name}.languages", f"{self.source} has no rows for {missing}")
        ordered = [p for lang in self.languages for p in per_lang[lang]]
        return ordered, {"name": self.format, "source": self.source, "languages": list(self.languages),
                         "n_per_language": {x: len(per_lang[x]) for x in self.languages}}

    def select(self, problems: list[CodeProblem]) -> list[CodeProblem]:
        """``limit`` applies per language."""
        if self.limit is None:
            return problems
        seen: dict[str, int] = {}
        out = []
        for p in problems:
            if seen.get(p.language, 0) < self.limit:
                out.append(p)
                seen[p.language] = seen.get(p.language, 0) + 1
        return out
