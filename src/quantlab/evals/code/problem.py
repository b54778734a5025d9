"""What a code-generation benchmark problem is, independent of language and dataset.

A :class:`CodeProblem` knows its prompt and stop sequences, how to turn a completion into a
:class:`~quantlab.execution.Program` (files + build/run steps) for the sandbox, and how to judge the
sandbox's :class:`~quantlab.execution.ProgramResult`. HumanEval, BabelCode and MultiPL-E rows are all
``CodeProblem`` s, so generation, execution, resume and pass@k are written once
(:mod:`quantlab.evals.code.runner`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

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

    task_id: str
    language: str
    prompt: str
    stop: tuple[str, ...]

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
