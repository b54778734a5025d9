"""MultiPL-E HumanEval problems (Cassano et al., TSE 2023; nuprl/MultiPL-E).

A row (``name, language, prompt, doctests, original, prompt_terminology, tests, stop_tokens``) is
judged on ``prompt + completion + "\\n" + tests`` (bigcode ``multiple_metrics/evaluation.py``): the
tests close the function (and Java's class) and assert the results; the program passes iff it exits
with code 0 *and* its tests ran to the end: every program is guarded by a completion token
(:mod:`quantlab.execution.sentinel`), so a completion that calls ``exit(0)`` fails, where MultiPL-E
would call it ``OK``. Per language, as MultiPL-E's ``evaluation/src/eval_*.py``:

* Python (``py``): ``python file.py``.
* C++ (``cpp``): ``g++ -std=c++17`` then the binary (``eval_cpp.py``).
* Java (``java``): ``javac -encoding UTF8`` then ``java -ea -cp . Problem`` (``eval_java.py``; ``-ea``
  matters: the tests are ``assert`` statements). Every MultiPL-E Java prompt has
  ``import org.javatuples.*;`` and problems returning tuples use ``Pair``/``Triplet``, which need
  ``javatuples-1.2.jar`` (MultiPL-E puts it on the ``CLASSPATH``). Pass ``javatuples_jar=`` to do the
  same. Without a jar the unused import is removed (a wildcard import of a package no name is taken
  from changes nothing), so only problems that really use javatuples fail, as compile errors whose
  message says that the jar is missing.
* Go (``go_test.go``): ``go test`` on a ``*_test.go`` file (``eval_go.py``; 30 s), here split into
  ``go test -c`` (the compile step, under the toolchain's compile limits) and a run of the test binary
  (30 s): the token must not exist while compiling (``//go:embed`` could read it), and ``go test``
  with a file list hides the stdout of passing tests. Build failures are compile errors as before.

Timeouts: MultiPL-E's ``safe_subprocess`` default of 15 s per command, 30 s for Go.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantlab.errors import DataError
from quantlab.evals.code.babelcode import EARLY_EXIT, head_tail, timeout_limits
from quantlab.evals.code.problem import Verdict, iter_rows, take_per_language, wanted_languages

if TYPE_CHECKING:
    from quantlab.execution import Program, ProgramResult

log = logging.getLogger(__name__)

HUB_REPO = "nuprl/MultiPL-E"
LANGUAGES: tuple[str, ...] = ("python", "java", "go", "cpp")
#: Dataset config suffix (``humaneval-<ext>``) per language.
HUB_EXT = {"python": "py", "java": "java", "go": "go", "cpp": "cpp"}
_ALIASES = {"py": "python", "python": "python", "java": "java", "cpp": "cpp", "c++": "cpp",
            "go": "go", "go_test.go": "go", "golang": "go"}
#: ``Translator.stop`` of ``dataset_builder/humaneval_to_*.py``, for rows without ``stop_tokens``.
DEFAULT_STOPS: dict[str, tuple[str, ...]] = {
    "python": ("\ndef", "\n#", "\nif", "\nclass"), "java": ("\n    }\n",), "cpp": ("\n}",),
    "go": ("\nfunc", "struct", "\n// "),
}
DEFAULT_TIMEOUT_S: dict[str, float] = {"python": 15.0, "java": 15.0, "cpp": 15.0, "go": 30.0}
JAVATUPLES_IMPORT_RE = re.compile(r"^[ \t]*import\s+org\.javatuples\.\*\s*;[ \t]*\n?", re.MULTILINE)
JAVATUPLES_JAR_NAME = "javatuples.jar"
_JAVATUPLES_NAMES = re.compile(r"symbol:\s+(?:class|variable)\s+(?:Unit|Pair|Triplet|Quartet|Quintet|Sextet|"
                               r"Septet|Octet|Ennead|Decade|KeyValue|LabelValue)\b")
_GO_TEST_FILE = "problem_test.go"


def normalize_language(name: str) -> str | None:
    """quantlab language of a MultiPL-E ``language`` field (``py`` -> ``python``, ``go_test.go`` -> ``go``)."""
    return _ALIASES.get(str(name).strip().lower())


@dataclass(frozen=True)
class MultiPLEProblem:
    """One MultiPL-E HumanEval problem (implements ``CodeProblem``).

    Attributes:
        task_id: ``<language>/<name>``, e.g. ``java/HumanEval_0_has_close_elements``.
        language: ``python`` / ``java`` / ``go`` / ``cpp``.
        prompt: the row's prompt, verbatim (bigcode's harness ``.strip()`` s it; MultiPL-E does not).
        stop: the row's ``stop_tokens``.
        tests: the row's tests (appended after the completion).
        name: the row's ``name``.
        timeout: seconds for the run step (``go test`` for Go).
        javatuples_jar: path of ``javatuples-1.2.jar`` for Java, or None (see the module docstring).
    """

    task_id: str
    language: str
    prompt: str
    stop: tuple[str, ...]
    tests: str
    name: str = ""
    timeout: float = 15.0
    javatuples_jar: str | None = None

    def source(self, completion: str) -> str:
        """``prompt + completion + "\\n" + tests`` (Java without a jar: minus the javatuples import)."""
        code = self.prompt + completion + "\n" + self.tests
        if self.language == "java" and not self.javatuples_jar:
            code = JAVATUPLES_IMPORT_RE.sub("", code)
        return code

    def program(self, completion: str) -> Program:
        """The guarded sandbox program for ``completion`` (see the module docstring for the commands).

        The toolchains already run Java as MultiPL-E does (``-encoding UTF-8``, ``-ea``, ``.jar`` extra
        files on the class path) and build a ``*_test.go`` source with ``go test -c``.
        """
        from quantlab.execution import get_toolchain

        toolchain = get_toolchain(self.language)
        names = {"java": "Problem.java", "go": _GO_TEST_FILE}
        jars = self._jar_files() if self.language == "java" else None
        return toolchain.program(self.source(completion), extra_files=jars, source_name=names.get(self.language),
                                 limits=timeout_limits(toolchain.limits, self.timeout), completion_token=True)

    def _jar_files(self) -> dict[str, bytes] | None:
        if not self.javatuples_jar:
            return None
        path = Path(self.javatuples_jar).expanduser()
        if not path.is_file():
            raise DataError(f"multipl_e: javatuples jar not found: {path}. Fix: pass the path of javatuples-1.2.jar")
        return {JAVATUPLES_JAR_NAME: path.read_bytes()}

    def judge(self, result: ProgramResult) -> Verdict:
        """Passed iff every step exited 0 (MultiPL-E ``OK``) and the tests ran to the end (the token)."""
        if result.timed_out:
            return Verdict("timed_out", f"step '{result.last.name}' timed out")
        if result.passed:
            return Verdict("passed")
        last = result.last
        out = (last.stdout + "\n" + last.stderr).strip()
        if result.ok:  # exit status 0, but the tests never finished
            return Verdict("failed", EARLY_EXIT + (f": {head_tail(out)}" if out else ""))
        if last.name != "run" or "[build failed]" in last.stdout or "[setup failed]" in last.stdout:
            where = "" if last.name == "compile" else f" ({' '.join(last.argv[1:2]) or last.name})"
            msg = f"compile error{where}: {head_tail(last.stderr.strip() or out)}"
            if self.language == "java" and not self.javatuples_jar and _needs_javatuples(last.stderr):
                msg = "needs javatuples-1.2.jar (javatuples_jar=...); " + msg
            return Verdict("failed", msg)
        return Verdict("failed", f"{last.status_text()}: {head_tail(out)}")


def _needs_javatuples(javac_stderr: str) -> bool:
    """javac failed on a javatuples name (``cannot find symbol ... Pair``) or on the package itself."""
    if "package org.javatuples does not exist" in javac_stderr:
        return True
    return any(_JAVATUPLES_NAMES.search(block) for block in javac_stderr.split("error: cannot find symbol")[1:])


def problem_from_row(row: dict[str, Any], where: str, javatuples_jar: str | None = None) -> MultiPLEProblem:
    """A :class:`MultiPLEProblem` from one MultiPL-E row.

    Raises:
        DataError: naming ``where`` (``file:line``) and the missing key or bad language.
    """
    for key in ("name", "language", "prompt", "tests"):
        if row.get(key) is None:
            raise DataError(f"{where}: MultiPL-E row is missing key '{key}'")
    language = normalize_language(row["language"])
    if language is None:
        raise DataError(f"{where}: unsupported MultiPL-E language {row['language']!r}")
    stops = row.get("stop_tokens")
    stop = tuple(stops) if stops else DEFAULT_STOPS[language]
    return MultiPLEProblem(
        task_id=f"{language}/{row['name']}", language=language, prompt=row["prompt"], stop=stop,
        tests=row["tests"], name=str(row["name"]), timeout=DEFAULT_TIMEOUT_S[language],
        javatuples_jar=javatuples_jar if language == "java" else None)


def _hub_rows(languages: Sequence[str]):
    try:
        import datasets
    except ImportError as e:
        raise DataError("multipl_e source 'hub' needs the 'datasets' package; install it or pass a local .jsonl") from e
    for lang in languages:
        config = f"humaneval-{HUB_EXT[lang]}"
        try:
            ds = datasets.load_dataset(HUB_REPO, config, split="test")
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"multipl_e source 'hub': cannot load {HUB_REPO} config {config} ({type(e).__name__}: {msg}). "
                f"Fix: connect to the hub once (the dataset is cached), or pass a local .jsonl of its rows") from e
        for i, row in enumerate(ds, 1):
            yield f"{HUB_REPO}/{config}:row {i}", row


def load_multipl_e(source: str, languages: Sequence[str] = LANGUAGES, limit: int | None = None,
                   javatuples_jar: str | None = None) -> list[MultiPLEProblem]:
    """Load MultiPL-E HumanEval problems.

    Args:
        source: a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file of MultiPL-E rows, or ``"hub"``
            (``datasets.load_dataset("nuprl/MultiPL-E", "humaneval-<ext>", split="test")`` per language).
        languages: ``python`` / ``java`` / ``go`` / ``cpp`` (MultiPL-E names ``py``, ``go_test.go`` accepted).
        limit: keep at most this many problems per language (file order).
        javatuples_jar: path of ``javatuples-1.2.jar`` for Java problems (see the module docstring).

    Raises:
        DataError: unknown language, unreadable source, bad row (naming file, line and key), or no
            problem of the requested languages.
    """
    wanted = wanted_languages(languages, normalize_language, LANGUAGES, "multipl_e")
    if source == "hub":
        rows = _hub_rows(wanted)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"multipl_e source '{source}': no such file. Fix: pass a .jsonl of MultiPL-E rows or 'hub'")
        rows = iter_rows(path)
    return take_per_language(rows, wanted, limit, normalize_language,
                             lambda row, where: problem_from_row(row, where, javatuples_jar), "MultiPL-E", source)
