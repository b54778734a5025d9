"""What a code-generation benchmark problem is, independent of language and dataset.

A :class:`CodeProblem` knows its prompt and stop sequences, how to turn a completion into a
:class:`~quantlab.execution.Program` (files + build/run steps) for the sandbox, and how to judge the
sandbox's :class:`~quantlab.execution.ProgramResult`. HumanEval, BabelCode and MultiPL-E rows are all
``CodeProblem`` s, so generation, execution, resume and pass@k are written once
(:mod:`quantlab.evals.code.runner`).
"""
from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from quantlab.errors import DataError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from quantlab.execution import Program, ProgramResult

Status = Literal["passed", "failed", "timed_out"]
STATUSES: tuple[str, ...] = ("passed", "failed", "timed_out")


@dataclass(frozen=True)
class Verdict:
    """Outcome of one completion.

    Attributes:
        status: ``passed`` / ``failed`` / ``timed_out``.
        error: why it failed (compiler error, exception name, missing test ids, ...), capped in length.
    """

    status: Status
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@runtime_checkable
class CodeProblem(Protocol):
    """One benchmark problem.

    Attributes:
        task_id: unique id within its dataset (``HumanEval/0``, ``java/HumanEval_0``, ...).
        language: ``python`` / ``java`` / ``go`` / ``cpp``.
        prompt: the text given to the model (completions continue it).
        stop: stop sequences; a completion is cut at the first one.
    """

    # read-only properties: the problems are frozen dataclasses
    @property
    def task_id(self) -> str: ...

    @property
    def language(self) -> str: ...

    @property
    def prompt(self) -> str: ...

    @property
    def stop(self) -> tuple[str, ...]: ...

    def program(self, completion: str) -> Program:
        """The program that tests ``completion`` (already cut at the stop sequences)."""
        ...

    def judge(self, result: ProgramResult) -> Verdict:
        """Turn the sandbox's result into a verdict."""
        ...


def cap_error(text: str, limit: int = 500) -> str:
    """Last ``limit`` characters of an error text (tracebacks end with the exception)."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def iter_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file; ``where`` = ``file:line``.

    Raises:
        DataError: a line that is not a JSON object (naming file and line).
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {i}", row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def wanted_languages(languages: Sequence[str], normalize: Callable[[str], str | None],
                     supported: Sequence[str], dataset: str) -> list[str]:
    """quantlab names of the requested ``languages`` (DataError naming an unsupported one)."""
    wanted = []
    for name in languages:
        lang = normalize(name)
        if lang is None or lang not in supported:
            raise DataError(f"{dataset}: unsupported language {name!r}; supported: {', '.join(supported)}")
        wanted.append(lang)
    return wanted


def take_per_language(rows: Iterable[tuple[str, dict[str, Any]]], wanted: Sequence[str], limit: int | None,
                      normalize: Callable[[str], str | None], build: Callable[[dict[str, Any], str], Any],
                      dataset: str, source: str) -> list[Any]:
    """``build(row, where)`` for the rows of the ``wanted`` languages, at most ``limit`` per language,
    in file order. DataError for a row without ``language`` or when nothing is left."""
    counts = dict.fromkeys(wanted, 0)
    problems = []
    for where, row in rows:
        if "language" not in row:
            raise DataError(f"{where}: {dataset} row is missing key 'language'")
        lang = normalize(row["language"])
        if lang not in counts or (limit is not None and counts[lang] >= limit):
            continue
        problems.append(build(row, where))
        counts[lang] += 1
    if not problems:
        raise DataError(f"{dataset} source '{source}': no problems for languages {list(wanted)}")
    log.info("%s: %d problems from %s (%s)", dataset, len(problems), source,
             ", ".join(f"{k}={v}" for k, v in counts.items()))
    return problems
