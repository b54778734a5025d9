"""BabelCode (bc-humaneval) and MultiPL-E problems: loaders, prompts/stops, judging, and real runs.

The fixture problems are made up for quantlab (``tests/fixtures/{babelcode,multipl_e}/make_fixtures.py``);
each has a correct and a wrong raw continuation, cut here at the problem's stop sequences exactly as
the evaluator does. Runs go through the sandbox; Java/Go/C++ tests skip when the toolchain is missing,
unless ``QUANTLAB_REQUIRE_SANDBOX=1`` (CI), where they fail.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from quantlab.errors import DataError
from quantlab.evals.code.babelcode import (
    STOP_WORDS,
    BabelCodeProblem,
    closing_text,
    load_babelcode,
    open_brace_depth,
    parse_test_outcomes,
)
from quantlab.evals.code.multipl_e import MultiPLEProblem, load_multipl_e
from quantlab.evals.code.problem import CodeProblem
from quantlab.execution import ProgramResult, StepResult
from quantlab.generation.stops import truncate_at_stop

FIX = Path(__file__).parent / "fixtures"
BC = FIX / "babelcode" / "bc_humaneval_sample.jsonl"
BC_FLAT = FIX / "babelcode" / "bc_humaneval_flat.jsonl"
ME = FIX / "multipl_e" / "humaneval_sample.jsonl"


def _solutions(path: Path) -> dict[str, dict]:
    return {r["task_id"]: r for r in map(json.loads, path.read_text().splitlines())}


BC_SOL = _solutions(FIX / "babelcode" / "bc_solutions.jsonl")
ME_SOL = _solutions(FIX / "multipl_e" / "solutions.jsonl")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- loaders
def test_babelcode_loads_nested_schema():
    problems = load_babelcode(str(BC))
    by_lang = {lang: [p for p in problems if p.language == lang] for lang in ("python", "java", "go", "cpp")}
    assert {k: len(v) for k, v in by_lang.items()} == {"python": 3, "java": 2, "go": 2, "cpp": 3}
    java = by_lang["java"][0]
    assert isinstance(java, CodeProblem)
    assert java.task_id == "java/0" and java.entry_fn_name == "sumOfSquares" and java.entry_cls_name == "Solution"
    assert java.test_case_ids == ("0", "1", "2") and java.timeout == 15.0
    assert java.prompt.startswith("class Solution {") and java.prompt.endswith("(ArrayList<Integer> nums) {")
    assert by_lang["python"][0].prompt.startswith("def sum_of_squares(nums: List[int]) -> int:")


def test_babelcode_flat_schema_equals_nested():
    flat = load_babelcode(str(BC_FLAT))
    nested = {p.task_id: p for p in load_babelcode(str(BC))}
    assert [p.task_id for p in flat] == ["python/0", "cpp/0"]
    assert all(p == nested[p.task_id] for p in flat)


def test_babelcode_loads_generate_test_code_output_and_parquet(tmp_path):
    rows = _rows(BC)
    testing = [{"language": r["language"], "qid": r["qid"], "title": r["title"], **r["question_info"]} for r in rows]
    prompts = [{k: r[k] for k in ("language", "qid", "signature", "signature_with_docstring", "text")} for r in rows]
    _write_jsonl(tmp_path / "testing_code.jsonl", testing)
    _write_jsonl(tmp_path / "prompt_info.jsonl", prompts)
    assert load_babelcode(str(tmp_path)) == load_babelcode(str(BC))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    assert load_babelcode(str(tmp_path / "test.parquet")) == load_babelcode(str(BC))


def test_babelcode_language_names_and_limit():
    problems = load_babelcode(str(BC), languages=["C++", "Python"], limit=1)
    assert [p.task_id for p in problems] == ["python/0", "cpp/0"]
    with pytest.raises(DataError, match="unsupported language 'rust'"):
        load_babelcode(str(BC), languages=["rust"])


@pytest.mark.parametrize("drop, key", [("test_code", "question_info.test_code"),
                                       ("entry_fn_name", "question_info.entry_fn_name")])
def test_babelcode_bad_row_names_file_line_and_key(tmp_path, drop, key):
    rows = _rows(BC)[:3]
    del rows[1]["question_info"][drop]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: BabelCode row is missing key '{key}'"):
        load_babelcode(str(path))


def test_babelcode_bad_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"qid": "0"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        load_babelcode(str(tmp_path / "broken.jsonl"))
    _write_jsonl(tmp_path / "nolang.jsonl", [{"qid": "0"}])
    with pytest.raises(DataError, match=r"nolang\.jsonl:1: .*missing key 'language'"):
        load_babelcode(str(tmp_path / "nolang.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_babelcode(str(tmp_path / "absent.jsonl"))
    rows = _rows(BC)[:1]
    del rows[0]["question_info"]["test_case_ids"]  # derived from test_list, as BabelCode's Question.to_dict
    assert load_babelcode(str(_write_jsonl(tmp_path / "ids.jsonl", rows)))[0].test_case_ids == ("0", "1", "2")
    rows[0]["question_info"]["test_list"] = "[{\"inputs\": {}}]"
    with pytest.raises(DataError, match=r"ids\.jsonl:1: malformed BabelCode row \(KeyError"):
        load_babelcode(str(_write_jsonl(tmp_path / "ids.jsonl", rows)))


def test_babelcode_hub_offline_and_parquet_conversion(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match=r"cannot download gabeorlanski/bc-humaneval .*pass a local file"):
        load_babelcode("hub")

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "default" / "test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_rows(BC)), tmp_path / "default" / "test" / "0000.parquet")
    revisions = []

    def fake(repo, repo_type, revision, allow_patterns):
        revisions.append(revision)
        return str(tmp_path if revision == "refs/convert/parquet" else tmp_path / "empty")

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert len(load_babelcode("hub", languages=["go"])) == 2 and revisions == [None, "refs/convert/parquet"]


def test_multipl_e_loader(tmp_path, monkeypatch):
    problems = {p.task_id: p for p in load_multipl_e(str(ME))}
    assert sorted(problems) == ["cpp/QL_0_sum_of_squares", "go/QL_0_sum_of_squares", "java/QL_0_sum_of_squares",
                                "java/QL_1_min_max", "python/QL_0_sum_of_squares"]
    assert problems["go/QL_0_sum_of_squares"].stop == ("\nfunc", "struct", "\n// ")
    assert problems["java/QL_0_sum_of_squares"].stop == ("\n    }\n",)
    assert [p.language for p in load_multipl_e(str(ME), languages=["go_test.go", "py"])] == ["python", "go"]
    rows = _rows(ME)
    del rows[2]["tests"]
    with pytest.raises(DataError, match=r"me\.jsonl:3: MultiPL-E row is missing key 'tests'"):
        load_multipl_e(str(_write_jsonl(tmp_path / "me.jsonl", rows)))
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nuprl/MultiPL-E' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load nuprl/MultiPL-E config humaneval-java .*local \.jsonl"):
        load_multipl_e("hub", languages=["java"])


# ------------------------------------------------------------------------------- prompts, stops, code
def test_stop_sequences_are_babelcodes():
    assert STOP_WORDS == {"python": ("\ndef", "\n#", "\nif", "\nclass"), "java": ("\n    }\n",),
                          "go": ("\nfunc", "struct", "\n// "), "cpp": ("\n}",)}
    for p in load_babelcode(str(BC)):
        assert p.stop == STOP_WORDS[p.language]


def test_brace_closing_ignores_comments_and_strings():
    code = 'int f() {\n  // {\n  /* { */ string s = "{\\"{"; char c = \'{\';\n  if (x) {\n'
    assert open_brace_depth(code, "cpp") == 2
    assert open_brace_depth("func f() string {\n  return `{`\n", "go") == 1
    assert closing_text(2) == "\n    }\n}\n" and closing_text(0) == ""


def test_source_closes_what_the_stop_sequence_cut():
    probs = {p.task_id: p for p in load_babelcode(str(BC))}
    java = probs["java/0"]
    body = truncate_at_stop(BC_SOL["java/0"]["correct"], java.stop)
    assert body.endswith("return total;")
    src = java.source(body)
    assert "return total;\n    }\n}\n" in src and "PLACEHOLDER" not in src and "class Main" not in src
    assert "sol.sumOfSquares(nums)" in src and "Solution sol = new Solution();" in src
    py = probs["python/0"]
    assert py.source("    return 1") .count("\"\"\"\n    return 1") == 1  # newline added after the docstring
    go = probs["go/0"]  # Go's stops keep the closing brace: nothing added
    assert go.source(truncate_at_stop(BC_SOL["go/0"]["correct"], go.stop)).count("return total\n}\n") == 1


def test_multipl_e_source_and_javatuples_import(tmp_path):
    problems = {p.task_id: p for p in load_multipl_e(str(ME))}
    cpp = problems["cpp/QL_0_sum_of_squares"]
    assert cpp.source("X") == cpp.prompt + "X\n" + cpp.tests
    java = problems["java/QL_0_sum_of_squares"]
    assert "org.javatuples" in java.prompt and "org.javatuples" not in java.source("")
    assert "import org.javatuples.*;" in replace(java, javatuples_jar=str(tmp_path / "j.jar")).source("")


# -------------------------------------------------------------------------------------------- judging
def _result(*steps: tuple) -> ProgramResult:
    return ProgramResult(tuple(StepResult(name, (name,), rc, out, err, to, 0.1, False) for name, rc, out, err, to in steps))


def test_babelcode_judge_rules():
    p = BabelCodeProblem("cpp/0", "cpp", "", STOP_WORDS["cpp"], "", ("0", "1"), "f")
    ok = "TEST-0...PASSED\nTEST-1...PASSED\n"
    assert parse_test_outcomes("x\nTEST-0...PASSED\nTEST-10...St12out_of_range\n") == {"0": "PASSED", "10": "St12out_of_range"}
    assert p.judge(_result(("compile", 0, "", "", False), ("run", 0, ok, "", False))).passed
    v = p.judge(_result(("compile", 1, "", "main.cpp:3: error: expected ';'", False)))
    assert v.status == "failed" and "compile error" in v.error and "expected ';'" in v.error
    v = p.judge(_result(("compile", 0, "", "", False), ("run", 0, "TEST-0...PASSED\n", "", False)))
    assert v.error == "missing test ids ['1']"
    v = p.judge(_result(("run", 0, "TEST-0...FAILED\nTEST-1...St12out_of_range\n", "", False)))
    assert v.error == "TEST-1...St12out_of_range"
    assert p.judge(_result(("run", 0, "TEST-0...FAILED\nTEST-1...PASSED\n", "", False))).error == "TEST-0...FAILED"
    v = p.judge(_result(("run", 0, ok, "warning: something\n", False)))  # BabelCode: stderr = error
    assert v.status == "failed" and "something" in v.error
    java = replace(p, language="java")
    assert java.judge(_result(("run", 0, ok, "Picked up JAVA_TOOL_OPTIONS: -Xss1m\n", False))).passed
    py = replace(p, language="python")
    warning = "/w/main.py:2: SyntaxWarning: invalid escape sequence '\\d'\n  x = re.compile('\\d+')\n"
    assert py.judge(_result(("run", 0, ok, warning, False))).passed
    assert not py.judge(_result(("run", 0, ok, warning + "Traceback (most recent call last):\n", False))).passed
    assert p.judge(_result(("run", -9, "TEST-0...PASSED\n", "", True))).status == "timed_out"


def test_multipl_e_judge_rules():
    p = MultiPLEProblem("go/x", "go", "", ("\nfunc",), "")
    assert p.judge(_result(("run", 0, "ok  \tcommand-line-arguments\t0.002s\n", "", False))).passed
    v = p.judge(_result(("run", 1, "# command-line-arguments\nFAIL\tproblem_test.go [build failed]\n", "x: undefined", False)))
    assert "compile error" in v.error
    v = p.judge(_result(("run", 1, "--- FAIL: TestF (0.00s)\n  expected '14', got '6'\nFAIL\n", "", False)))
    assert v.status == "failed" and "expected '14', got '6'" in v.error
    java = MultiPLEProblem("java/x", "java", "", ("\n    }\n",), "")
    v = java.judge(_result(("compile", 1, "", "Problem.java:11: error: cannot find symbol\n  symbol:   class Pair", False)))
    assert v.error.startswith("needs javatuples-1.2.jar")
    v = java.judge(_result(("compile", 1, "", "Problem.java:9: error: cannot find symbol\n  symbol:   variable x", False)))
    assert v.error.startswith("compile error: Problem.java:9")


# ------------------------------------------------------------------------------ real runs (sandbox)
REQUIRE_SANDBOX = os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1"
LOOP_TIMEOUT_S = 2.0
BROKEN = {  # completions that do not compile (Python: do not parse)
    "python": "\n    return (\n", "java": "\n        return undefinedName;\n",
    "go": "\n    return undefinedName\n}\n", "cpp": "\n    return undefinedName;\n",
}
BROKEN_MSG = {"python": "SyntaxError", "java": "cannot find symbol", "go": "undefined: undefinedName",
              "cpp": "was not declared in this scope"}
LOOPS = {
    "python": "\n    while True:\n        pass\n", "java": "\n        while (true) {}\n",
    "go": "\n    for {\n    }\n}\n", "cpp": "\n    volatile long spin = 0;\n    for (;;) { spin++; }\n",
}
#: What the wrong completion's verdict must say.
BC_WRONG_MSG = {
    "python/0": "TEST-0...FAILED", "python/1": "TEST-0...IndexError", "python/2": "TEST-1...FAILED",
    "java/0": "TEST-0...FAILED", "java/1": "TEST-0...ArrayIndexOutOfBoundsException",
    "go/0": "TEST-0...FAILED", "go/1": "index out of range",
    "cpp/0": "TEST-0...FAILED", "cpp/1": "out_of_range", "cpp/2": "TEST-0...FAILED",
}
ME_WRONG_MSG = {"python": "AssertionError", "java": "AssertionError", "cpp": "Assertion", "go": "--- FAIL: TestSum_Of_Squares"}
BC_PROBLEMS = {p.task_id: p for p in load_babelcode(str(BC))}
ME_PROBLEMS = {p.task_id: p for p in load_multipl_e(str(ME))}


def _cases() -> list[tuple[str, str, object, str, str, str]]:
    """(case id, language, problem, raw completion, expected status, expected error substring)."""
    cases = []
    for tid, p in BC_PROBLEMS.items():
        cases.append((f"bc-{tid}-correct", p.language, p, BC_SOL[tid]["correct"], "passed", ""))
        cases.append((f"bc-{tid}-wrong", p.language, p, BC_SOL[tid]["wrong"], "failed", BC_WRONG_MSG[tid]))
        if tid.endswith("/0"):
            cases.append((f"bc-{tid}-broken", p.language, p, BROKEN[p.language], "failed", BROKEN_MSG[p.language]))
            loop = replace(p, timeout=LOOP_TIMEOUT_S)
            cases.append((f"bc-{tid}-loop", p.language, loop, LOOPS[p.language], "timed_out", ""))
    for tid, p in ME_PROBLEMS.items():
        if tid == "java/QL_1_min_max":  # without the jar: a compile error that names the jar
            cases.append((f"me-{tid}-nojar", "java", p, ME_SOL[tid]["correct"], "failed", "needs javatuples-1.2.jar"))
            continue
        cases.append((f"me-{tid}-correct", p.language, p, ME_SOL[tid]["correct"], "passed", ""))
        cases.append((f"me-{tid}-wrong", p.language, p, ME_SOL[tid]["wrong"], "failed", ME_WRONG_MSG[p.language]))
        if p.language == "go":  # built by `go test -c`: a compile step that fails with the compiler's message
            cases.append((f"me-{tid}-broken", "go", p, BROKEN["go"][1:], "failed",
                          "compile error: # command-line-arguments_test"))
    return cases


CASES = {c[0]: c for c in _cases()}


def _toolchain_problem(language: str) -> str | None:
    """Why ``language`` cannot run here (None: it can)."""
    from quantlab.execution import ToolchainMissing, get_toolchain

    try:
        get_toolchain(language).version()
    except ToolchainMissing as e:
        return str(e)
    return None


def need_toolchain(language: str) -> None:
    """Skip (fail under ``QUANTLAB_REQUIRE_SANDBOX=1``) when ``language``'s toolchain is missing."""
    why = _toolchain_problem(language)
    if why is None:
        return
    if REQUIRE_SANDBOX:
        pytest.fail(f"QUANTLAB_REQUIRE_SANDBOX=1 but the {language} toolchain is missing: {why}")
    pytest.skip(f"{language} toolchain missing: {why}")


@pytest.fixture(scope="module")
def sandbox():
    from quantlab.execution import Sandbox

    return Sandbox(workers=2)


@pytest.fixture(scope="module")
def verdicts(sandbox, request):
    """Verdict of every selected case, run together (in parallel) through ``Sandbox.run_many``."""
    import logging
    import time

    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_run" and hasattr(item, "callspec")}
    runnable = {lang: _toolchain_problem(lang) is None for lang in ("python", "java", "go", "cpp")}
    todo = [CASES[c] for c in sorted(selected) if runnable[CASES[c][1]]]
    programs = [p.program(truncate_at_stop(raw, p.stop)) for _, _, p, raw, _, _ in todo]
    t0 = time.perf_counter()
    results = sandbox.run_many(programs)
    wall = time.perf_counter() - t0
    per_lang: dict[str, float] = {}
    for (_, lang, *_), res in zip(todo, results):
        per_lang[lang] = per_lang.get(lang, 0.0) + sum(s.wall_s for s in res.steps)
    logging.getLogger(__name__).info("%d programs in %.1f s wall; summed step time per language: %s", len(todo), wall,
                                     {k: round(v, 1) for k, v in per_lang.items()})
    return {c[0]: (c[2].judge(r), r) for c, r in zip(todo, results)}


def _mark(case_id: str):
    """A correct program per language plus the key failure paths in the default suite; the rest is ``slow``."""
    fast = {"bc-python/0-correct", "bc-python/0-wrong", "bc-python/0-loop", "bc-java/0-correct", "bc-java/0-wrong",
            "bc-go/0-correct", "bc-go/1-wrong", "bc-cpp/0-correct", "bc-cpp/0-broken",
            "me-java/QL_0_sum_of_squares-correct", "me-java/QL_0_sum_of_squares-wrong", "me-go/QL_0_sum_of_squares-correct"}
    return pytest.param(case_id, marks=() if case_id in fast else pytest.mark.slow, id=case_id)


@pytest.mark.parametrize("case", [_mark(c) for c in CASES])
def test_run(case, verdicts):
    _, language, problem, raw, status, message = CASES[case]
    need_toolchain(language)
    verdict, result = verdicts[case]
    assert verdict.status == status, f"{case}: {verdict} / {result.error_text()}"
    assert message in verdict.error, f"{case}: {verdict.error!r} lacks {message!r}"


STUB_PAIR = """package org.javatuples;
public final class Pair<A, B> {
    private final A a;
    private final B b;
    private Pair(A a, B b) { this.a = a; this.b = b; }
    public static <A, B> Pair<A, B> with(A a, B b) { return new Pair<>(a, b); }
    @Override public boolean equals(Object o) {
        return o instanceof Pair && java.util.Objects.equals(a, ((Pair<?, ?>) o).a)
            && java.util.Objects.equals(b, ((Pair<?, ?>) o).b);
    }
    @Override public int hashCode() { return java.util.Objects.hash(a, b); }
}
"""


@pytest.mark.slow
def test_multipl_e_java_with_javatuples_jar(tmp_path, sandbox):
    """With a jar (here a stub ``org.javatuples.Pair`` built for the test) the import stays and tuples work."""
    import shutil
    import subprocess

    need_toolchain("java")
    if shutil.which("jar") is None:
        pytest.fail("the JDK's 'jar' tool is missing although javac is installed")
    src = tmp_path / "org" / "javatuples" / "Pair.java"
    src.parent.mkdir(parents=True)
    src.write_text(STUB_PAIR)
    subprocess.run(["javac", "-d", str(tmp_path / "classes"), str(src)], check=True, capture_output=True)
    jar = tmp_path / "javatuples.jar"
    subprocess.run(["jar", "cf", str(jar), "-C", str(tmp_path / "classes"), "."], check=True, capture_output=True)
    problems = {p.task_id: p for p in load_multipl_e(str(ME), languages=["java"], javatuples_jar=str(jar))}
    cases = [(p, ME_SOL[tid][kind]) for tid, p in problems.items() for kind in ("correct", "wrong")]
    results = sandbox.run_many([p.program(truncate_at_stop(raw, p.stop)) for p, raw in cases])
    verdicts = [p.judge(r) for (p, _), r in zip(cases, results)]
    assert [v.status for v in verdicts] == ["passed", "failed"] * 2, verdicts
    assert all("AssertionError" in v.error for v in verdicts[1::2])
    with pytest.raises(DataError, match="javatuples jar not found"):
        replace(problems["java/QL_1_min_max"], javatuples_jar=str(tmp_path / "absent.jar")).program("")


def test_missing_toolchain_skips_or_fails_under_ci(monkeypatch):
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "_toolchain_problem", lambda lang: "'go' not found on PATH")
    monkeypatch.setattr(this, "REQUIRE_SANDBOX", False)
    with pytest.raises(pytest.skip.Exception, match="go toolchain missing"):
        need_toolchain("go")
    monkeypatch.setattr(this, "REQUIRE_SANDBOX", True)
    with pytest.raises(pytest.fail.Exception, match="QUANTLAB_REQUIRE_SANDBOX=1"):
        need_toolchain("go")
