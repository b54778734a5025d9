"""BabelCode ``bc-humaneval`` problems (Orlanski et al. 2023, google-research/babelcode).

Each row of BC-HumanEval is one HumanEval question rendered in one language: a prompt
(``signature_with_docstring``) and a ``test_code`` file = imports + ``PLACEHOLDER_CODE_BODY`` + a
driver that calls ``PLACEHOLDER_FN_NAME`` (on a ``PLACEHOLDER_CLS_NAME`` instance in Java) for every
test case and prints ``TEST-<idx>...PASSED|FAILED|<ExceptionName>`` (``templates/<Lang>/main.txt``).

What follows BabelCode, and where:

* placeholders filled as in ``babelcode/drivers.py`` (``setup_language_code_dirs``);
* stop sequences from ``data/language_stop_words.json``;
* judging as ``data_types/result_types.py``: regex ``^TEST-(.+)\\.\\.\\.(.+)$`` over the stdout of the
  last command; a non-zero exit or output on stderr is an error, a missing test id is an error, a
  test that printed an exception name is a runtime error, ``FAILED`` a failed test; passed only if
  every ``test_case_id`` printed ``PASSED``; and (not in BabelCode) only if the driver's ``main``
  returned: programs are guarded by a completion token (:mod:`quantlab.execution.sentinel`), so a
  completion that prints the ``PASSED`` lines itself and exits 0 fails;
* timeouts from the row (``question_info.timeouts``; BabelCode defaults: Java 15 s, others 10 s).

Deviations (see :meth:`BabelCodeProblem.source`): BabelCode evaluates *whole* programs and leaves
turning a prompt continuation into one to the caller. Here the program is ``prompt + completion`` and
braces the completion left open are closed again (Java's stop ``"\\n    }\\n"`` and C++'s ``"\\n}"``
cut the closing brace off). Programs are built by the sandbox toolchains (``javac`` + ``java``
instead of the single-file ``java File.java`` launcher; ``g++ -std=c++17`` instead of the compiler
default), which does not change what passes. For the completion-token wrapper the driver text is
adapted before the completion goes in (:meth:`BabelCodeProblem.guarded_test_code`): Python's closing
``sys.exit(0)`` is dropped (same exit status) and Go's ``func main()`` is renamed for the wrapper's
``main`` to call; what runs is otherwise BabelCode's driver.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantlab.errors import DataError
from quantlab.evals.code.problem import Verdict, cap_error, iter_rows, take_per_language, wanted_languages

if TYPE_CHECKING:
    from quantlab.execution import Limits, Program, ProgramResult

log = logging.getLogger(__name__)

HUB_REPO = "gabeorlanski/bc-humaneval"
LANGUAGES: tuple[str, ...] = ("python", "java", "go", "cpp")
#: ``data/language_stop_words.json`` of BabelCode.
STOP_WORDS: dict[str, tuple[str, ...]] = {
    "python": ("\ndef", "\n#", "\nif", "\nclass"),
    "java": ("\n    }\n",),
    "go": ("\nfunc", "struct", "\n// "),
    "cpp": ("\n}",),
}
#: Per-command timeouts of BabelCode's ``lang_implementations/*.py`` (``Command.timeout`` = 10 s).
DEFAULT_TIMEOUT_S: dict[str, float] = {"python": 10.0, "java": 15.0, "go": 10.0, "cpp": 10.0}
_ALIASES = {"python": "python", "python3": "python", "py": "python", "java": "java", "go": "go",
            "golang": "go", "c++": "cpp", "cpp": "cpp"}
TEST_LINE_RE = re.compile(r"^TEST-(.+)\.\.\.(.+)$", re.MULTILINE)
#: stderr lines that are not errors of the program: JVM notices, and Python warnings (Python >= 3.12
#: prints a SyntaxWarning for invalid escapes that BabelCode's Python 3.9 kept silent).
_BENIGN_STDERR_RE = {
    "java": re.compile(r"^Picked up \w+_OPTIONS:.*$\n?", re.MULTILINE),
    "python": re.compile(r"^\S.*:\d+: \w*Warning: .*\n(?:[ \t]+.*\n?)?", re.MULTILINE),
}
_RUN_STEP = "run"
#: The closing ``sys.exit(0)`` of BabelCode's Python driver (``templates/Python/main.txt``).
_PY_DRIVER_EXIT_RE = re.compile(r"\n[ \t]+sys\.exit\(0\)[ \t]*\n?\s*\Z")
EARLY_EXIT = "exited with status 0 before the tests finished (no completion token)"


def normalize_language(name: str) -> str | None:
    """quantlab language name of a BabelCode/user language name (``"C++"`` -> ``"cpp"``); None if unknown."""
    return _ALIASES.get(str(name).strip().lower())


def _skip_quoted(code: str, i: int, quote: str) -> int:
    """Index just past the string/char literal that starts at ``code[i] == quote``."""
    j = i + 1
    while j < len(code) and code[j] != quote and code[j] != "\n":
        j += 2 if code[j] == "\\" else 1
    return j + 1


def open_brace_depth(code: str, language: str) -> int:
    """Net number of ``{`` not closed in C-like ``code``, ignoring comments and string/char literals."""
    depth, i, n = 0, 0, len(code)
    while i < n:
        c = code[i]
        if code.startswith("//", i):
            j = code.find("\n", i)
            i = n if j == -1 else j
            continue
        if code.startswith("/*", i):
            j = code.find("*/", i + 2)
            i = n if j == -1 else j + 2
            continue
        if language == "java" and code.startswith('"""', i):
            j = code.find('"""', i + 3)
            i = n if j == -1 else j + 3
            continue
        if c in "\"'":
            i = _skip_quoted(code, i, c)
            continue
        if c == "`" and language == "go":
            j = code.find("`", i + 1)
            i = n if j == -1 else j + 1
            continue
        depth += (c == "{") - (c == "}")
        i += 1
    return depth


def closing_text(depth: int, indent: str = "    ") -> str:
    """Lines that close ``depth`` open blocks, innermost first (``"\\n    }\\n}\\n"`` for 2)."""
    return "\n" + "".join(indent * (depth - 1 - k) + "}\n" for k in range(depth)) if depth > 0 else ""


def java_main_class(code: str) -> str:
    """Name of the class that declares ``static void main`` (BabelCode: ``QuestionEvaluator``)."""
    m = re.search(r"static\s+void\s+main\s*\(", code)
    classes = list(re.finditer(r"\bclass\s+([A-Za-z_]\w*)", code[: m.start()] if m else code))
    if not classes:
        raise DataError("BabelCode Java test_code declares no class with a main method")
    return classes[-1].group(1)


def parse_test_outcomes(stdout: str) -> dict[str, str]:
    """``{test id: outcome}`` printed as ``TEST-<id>...<outcome>`` (BabelCode ``GET_TC_REGEX``)."""
    return {k.strip(): v.strip() for k, v in TEST_LINE_RE.findall(stdout)}


@dataclass(frozen=True)
class BabelCodeProblem:
    """One BC-HumanEval question in one language (implements ``CodeProblem``).

    Attributes:
        task_id: ``<language>/<qid>``, e.g. ``java/12``.
        language: ``python`` / ``java`` / ``go`` / ``cpp``.
        prompt: ``signature_with_docstring`` (falls back to ``signature`` for rows without text).
        stop: BabelCode's stop words for the language.
        test_code: the test file with ``PLACEHOLDER_CODE_BODY`` / ``_FN_NAME`` / ``_CLS_NAME`` holes.
        test_case_ids: ids every one of which must print ``PASSED``.
        entry_fn_name: function the driver calls (camelCase outside Python).
        entry_cls_name: class the Java driver instantiates (``Solution``).
        timeout: seconds for running the program (the largest of the row's command timeouts).
        qid: BabelCode question id.
        title: question title.
    """

    task_id: str
    language: str
    prompt: str
    stop: tuple[str, ...]
    test_code: str
    test_case_ids: tuple[str, ...]
    entry_fn_name: str
    entry_cls_name: str = "Solution"
    timeout: float = 10.0
    qid: str = ""
    title: str = ""

    def source(self, completion: str) -> str:
        """The full test file for ``completion`` (the continuation of :attr:`prompt`, already cut).

        ``code = prompt + completion`` (a newline is put between them if neither side has one:
        BabelCode's prompts end without one), plus closing braces for blocks the completion left
        open (C-like languages only), substituted into ``test_code`` like ``babelcode/drivers.py``.
        """
        return self._fill(self.test_code, completion)

    def _fill(self, test_code: str, completion: str) -> str:
        sep = "" if self.prompt.endswith("\n") or completion.startswith("\n") else "\n"
        code = self.prompt + sep + completion
        if self.language != "python":
            code += closing_text(open_brace_depth(code, self.language))
        filled = test_code.replace("PLACEHOLDER_CODE_BODY", code)
        filled = filled.replace("PLACEHOLDER_FN_NAME", self.entry_fn_name)
        return filled.replace("PLACEHOLDER_CLS_NAME", self.entry_cls_name)

    def guarded_test_code(self) -> str:
        """:attr:`test_code` prepared for the completion-token wrapper (:mod:`quantlab.execution.sentinel`).

        Python: the driver's closing ``sys.exit(0)`` is removed (the wrapper counts any ``SystemExit``
        as an early exit; the module then ends with status 0 as before). Go: the driver's
        ``func main()`` is renamed for the wrapper's ``main`` to call. Done on the driver text before
        the completion is substituted, so a completion can neither match nor hide these.
        """
        from quantlab.execution.sentinel import GO_REAL_MAIN, rename_go_main

        if self.language == "python":
            return _PY_DRIVER_EXIT_RE.sub("\n", self.test_code)
        if self.language == "go":
            return rename_go_main(self.test_code, GO_REAL_MAIN, where=f"babelcode {self.task_id} test_code")
        return self.test_code

    def program(self, completion: str) -> Program:
        """The sandbox program (toolchain build + run) for ``completion``; the run step gets :attr:`timeout`.

        Guarded by a completion token: it passes only if the driver's ``main`` returned normally.
        """
        from quantlab.execution import get_toolchain
        from quantlab.execution.sentinel import GO_REAL_MAIN

        toolchain = get_toolchain(self.language)
        source_name = f"{java_main_class(self.test_code)}.java" if self.language == "java" else None
        return toolchain.program(self._fill(self.guarded_test_code(), completion), source_name=source_name,
                                 limits=timeout_limits(toolchain.limits, self.timeout), completion_token=True,
                                 go_main=GO_REAL_MAIN if self.language == "go" else None)

    def judge(self, result: ProgramResult) -> Verdict:
        """BabelCode's outcome rules (``result_types.py``) on the sandbox result, plus the token."""
        if result.timed_out:
            return Verdict("timed_out", f"step '{result.last.name}' timed out")
        last = result.last
        if last.name != _RUN_STEP:
            if last.returncode == 0:  # never reached the run step although nothing failed
                return Verdict("failed", f"run step missing; last step '{last.name}'")
            return Verdict("failed", f"compile error ({last.name}): {head_tail(last.stderr or last.stdout)}")
        outcomes = parse_test_outcomes(last.stdout)
        missing = [t for t in self.test_case_ids if t not in outcomes]
        shown = f"missing test ids {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        benign = _BENIGN_STDERR_RE.get(self.language)
        stderr = (benign.sub("", last.stderr) if benign else last.stderr).strip()
        if last.returncode != 0 or stderr:  # BabelCode: non-zero exit or any stderr = "Had Error"
            what = f"runtime error ({last.status_text()})" + (f"; {shown}" if missing else "")
            return Verdict("failed", f"{what}: {head_tail(stderr or last.stdout)}")
        if not result.finished:  # exit 0, but the driver's main never returned: its TEST lines prove nothing
            return Verdict("failed", EARLY_EXIT + (f"; {shown}" if missing else ""))
        if missing:
            return Verdict("failed", shown)
        bad = [(t, outcomes[t]) for t in self.test_case_ids if outcomes[t] != "PASSED"]
        if bad:
            errors = [b for b in bad if b[1] != "FAILED"] or bad  # runtime errors outrank failed tests
            return Verdict("failed", cap_error(", ".join(f"TEST-{t}...{o}" for t, o in errors[:5])))
        return Verdict("passed")


def timeout_limits(limits: Limits | None, timeout: float) -> Limits:
    """``limits`` with the wall-clock limit set to ``timeout`` seconds.

    The CPU-time limit is raised to at least ``timeout`` too, so that the wall clock (BabelCode's and
    MultiPL-E's only limit) is what ends a slow program.
    """
    from quantlab.execution import Limits

    limits = limits if limits is not None else Limits()
    return replace(limits, timeout_s=timeout, cpu_s=max(limits.cpu_s, timeout))


def head_tail(text: str, limit: int = 400) -> str:
    """``text`` cut to about ``limit`` characters keeping both ends (Go/Java put the error first, Python last)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " ... " + text[-(limit - head):]


# --------------------------------------------------------------------------------------------- loading
def _get(row: dict[str, Any], info: dict[str, Any], key: str, where: str, prefix: str) -> Any:
    if key in info and info[key] is not None:
        return info[key]
    if key in row and row[key] is not None:  # older revisions: flattened at top level
        return row[key]
    raise DataError(f"{where}: BabelCode row is missing key '{prefix}{key}'")


def problem_from_row(row: dict[str, Any], where: str) -> BabelCodeProblem:
    """A :class:`BabelCodeProblem` from one row of either schema (nested ``question_info`` or flat).

    Raises:
        DataError: naming ``where`` (``file:line``) and the missing or bad key.
    """
    try:
        return _problem_from_row(row, where)
    except (KeyError, TypeError, ValueError) as e:  # malformed values (not missing keys: those are DataErrors)
        raise DataError(f"{where}: malformed BabelCode row ({type(e).__name__}: {e})") from e


def _problem_from_row(row: dict[str, Any], where: str) -> BabelCodeProblem:
    for key in ("qid", "language"):
        if key not in row:
            raise DataError(f"{where}: BabelCode row is missing key '{key}'")
    language = normalize_language(row["language"])
    if language is None:
        raise DataError(f"{where}: unsupported BabelCode language {row['language']!r}")
    info = row.get("question_info") or {}
    if isinstance(info, str):
        info = json.loads(info)
    pre = "question_info." if "question_info" in row else ""
    prompt = row.get("signature_with_docstring") or row.get("signature")
    if not prompt:
        raise DataError(f"{where}: BabelCode row is missing key 'signature_with_docstring'")
    test_code = _get(row, info, "test_code", where, pre)
    entry_fn = _get(row, info, "entry_fn_name", where, pre)
    ids = info.get("test_case_ids", row.get("test_case_ids"))
    if ids is None:  # derive from test_list (``Question.to_dict``: str(t['idx']))
        tests = _get(row, info, "test_list", where, pre)
        tests = json.loads(tests) if isinstance(tests, str) else tests
        ids = [t["idx"] for t in tests]
    if isinstance(ids, str) or not ids:
        raise DataError(f"{where}: BabelCode row has a bad '{pre}test_case_ids' (need a non-empty list)")
    timeouts = info.get("timeouts", row.get("timeouts")) or [DEFAULT_TIMEOUT_S[language]]
    qid = str(row["qid"])
    return BabelCodeProblem(
        task_id=f"{language}/{qid}", language=language, prompt=prompt, stop=STOP_WORDS[language],
        test_code=test_code, test_case_ids=tuple(str(i) for i in ids), entry_fn_name=entry_fn,
        entry_cls_name=info.get("entry_cls_name", row.get("entry_cls_name")) or "Solution",
        timeout=float(max(timeouts)), qid=qid, title=str(row.get("title", "")))


def _generated_dir_rows(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a ``generate_test_code.py`` output folder: ``testing_code.jsonl`` joined with ``prompt_info.jsonl``."""
    prompts = {(r.get("language"), str(r.get("qid"))): r for _, r in iter_rows(folder / "prompt_info.jsonl")}
    for where, row in iter_rows(folder / "testing_code.jsonl"):
        yield where, {**prompts.get((row.get("language"), str(row.get("qid"))), {}), **row}


def _hub_files(repo: str) -> list[Path]:
    """Data files of the hub dataset (its own, else the hub's parquet conversion), via the local cache."""
    from huggingface_hub import snapshot_download

    patterns = ["*.jsonl", "*.jsonl.gz", "*.parquet", "**/*.jsonl", "**/*.jsonl.gz", "**/*.parquet"]
    for revision in (None, "refs/convert/parquet"):
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz", ".parquet")))
        if files:
            return files
    return []


def _source_rows(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if source == "hub":
        fix = (f"Fix: pass a local file instead (dataset.source=/path/to/bc_humaneval.jsonl): the rows of "
               f"{HUB_REPO} (split test), e.g. BabelCode's data/hf_datasets/human_eval.jsonl or the output "
               "folder of its generate_test_code.py (testing_code.jsonl + prompt_info.jsonl)")
        try:
            files = _hub_files(HUB_REPO)
        except Exception as e:  # offline, no access, hub errors: all the same fix
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"babelcode source 'hub': cannot download {HUB_REPO} ({type(e).__name__}: {msg}). {fix}") from e
        if not files:
            raise DataError(f"babelcode source 'hub': {HUB_REPO} has no data files on the hub (its loader is a "
                            f"script, which datasets>=4 does not run). {fix}")
        for f in files:
            yield from iter_rows(f)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "testing_code.jsonl").is_file():
            raise DataError(f"babelcode source '{source}': the folder has no testing_code.jsonl")
        yield from _generated_dir_rows(path)
    elif path.is_file():
        yield from iter_rows(path)
    else:
        raise DataError(f"babelcode source '{source}': no such file. Fix: pass a .jsonl/.jsonl.gz/.parquet "
                        "file of bc-humaneval rows, a generate_test_code.py output folder, or 'hub'")


def load_babelcode(source: str, languages: Sequence[str] = LANGUAGES, limit: int | None = None) -> list[BabelCodeProblem]:
    """Load BC-HumanEval problems.

    Args:
        source: a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file of rows (current schema with nested
            ``question_info`` or the older flattened one), a BabelCode ``generate_test_code.py`` output
            folder, or ``"hub"`` (data files of ``gabeorlanski/bc-humaneval`` via ``huggingface_hub``).
        languages: languages to keep (``python``, ``java``, ``go``, ``cpp``; BabelCode names such as
            ``"C++"`` are accepted).
        limit: keep at most this many problems *per language* (file order).

    Returns:
        Problems in file order.

    Raises:
        DataError: unknown language, unreadable source, bad row (naming file, line and key), or no
            problem of the requested languages.
    """
    wanted = wanted_languages(languages, normalize_language, LANGUAGES, "babelcode")
    return take_per_language(_source_rows(source), wanted, limit, normalize_language, problem_from_row,
                             "BabelCode", source)
