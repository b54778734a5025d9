"""Completion tokens (quantlab.execution.sentinel): a program passes only when its test harness ran to the end.

Every early exit a completion can reach (``quantlab.execution.earlyexit``: HumanEval/0 and hand-made
BabelCode/MultiPL-E problems in Python, Java, Go and C++) must be judged failed, the correct solutions
must pass, a flooded HumanEval stdout must not matter, and the token must be nowhere the program can
look (work dir, argv, environment), not even from code that runs before ``main``. Missing compilers
skip the compiled-language tests, or fail them when QUANTLAB_REQUIRE_SANDBOX=1 (CI).
"""
from __future__ import annotations

import os
import shutil

import pytest

from quantlab.errors import ConfigError, DataError
from quantlab.evals.code.babelcode import EARLY_EXIT, BabelCodeProblem
from quantlab.evals.code.humaneval import load_humaneval
from quantlab.evals.code.multipl_e import MultiPLEProblem
from quantlab.execution import Limits, Program, ProgramResult, Sandbox, Step, StepResult, ToolchainMissing
from quantlab.execution import earlyexit as ee
from quantlab.execution import isolation as iso
from quantlab.execution import sentinel as sn
from quantlab.execution import toolchains as tcs
from quantlab.execution.sandbox import JUDGE

REQUIRE = os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1"
HE0 = load_humaneval()[0]
TOKEN = "quantlab-done-" + "ab" * 16


def need_toolchain(language: str) -> None:
    """Skip when ``language``'s tools are missing, fail instead when QUANTLAB_REQUIRE_SANDBOX=1."""
    try:
        tcs.get_toolchain(language).version()
    except ToolchainMissing as e:
        (pytest.fail if REQUIRE else pytest.skip)(str(e))


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(Limits(timeout_s=10.0, cpu_s=10.0), isolation="auto", workers=2)
    with pytest.MonkeyPatch.context() as mp:  # root without bubblewrap: the sandbox uid must reach Python
        if sb.isolation == "none" and iso.is_root() and not iso.reachable_by_others(tcs.python_interpreter()):
            alt = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
            if alt and iso.reachable_by_others(alt):
                mp.setenv("QUANTLAB_SANDBOX_PYTHON", alt)
        yield sb


# ------------------------------------------------------------------------------------- units (no runs)
def _result(rc: int, out: str = "", err: str = "", seen: bool = False, token: str | None = TOKEN) -> ProgramResult:
    return ProgramResult((StepResult("run", ("run",), rc, out, err, False, 0.1, False),), token=token, token_seen=seen)


def test_result_finished_passed_and_error_text():
    assert _result(0, seen=True).passed and _result(0, token=None).passed  # unguarded: exit status only
    early = _result(0, out="TEST-0...PASSED\n", err="AssertionError")
    assert early.ok and not early.finished and not early.passed
    assert early.error_text() == ("step 'run' exited with status 0 before the tests finished (no completion token): "
                                  "AssertionError")
    assert not _result(1, seen=True).passed and _result(1).error_text().startswith("step 'run' exit code 1")
    assert TOKEN not in repr(early) and TOKEN not in repr(Program({}, (Step(("true",)),), token=TOKEN))


def test_program_token_validation_and_reserved_names():
    with pytest.raises(ConfigError, match="sandbox.program.token"):
        Program({}, (Step(("true",)),), token="bad token\n")
    with pytest.raises(ConfigError, match="reserved for the completion token"):
        Program({sn.TOKEN_FILE: "x"}, (Step(("true",)),), token=TOKEN)
    with pytest.raises(ConfigError, match="'_quantlab_main.py' is reserved"):
        tcs.get_toolchain("python").program("x = 1", extra_files={sn.PY_WRAPPER: ""}, completion_token=True)
    a, b = (tcs.get_toolchain("python").program("x = 1", completion_token=True) for _ in range(2))
    assert a.token != b.token and a.token not in str(a.files) + str(a.steps) + str(a.env)
    assert tcs.get_toolchain("python").program("x = 1").token is None


def test_go_helpers_name_the_source():
    src = "package main\n\nfunc helper() {}\n\nfunc main() {\n}\n\n// func main() in a comment\n"
    renamed = sn.rename_go_main(src)
    assert "func quantlabRealMain() {" in renamed and renamed.count("func main()") == 1  # the comment stays
    with pytest.raises(DataError, match="x.go: no top-level 'func main\\(\\)'"):
        sn.rename_go_main("package main\n", where="x.go")
    assert sn.go_package("// Package doc: package fake\n/* package fake2 */\npackage real_test\n") == "real_test"
    with pytest.raises(DataError, match="y_test.go: no 'package' clause"):
        sn.go_package("func f() {}\n", where="y_test.go")


def test_judges_require_the_token():
    ok = "TEST-0...PASSED\nTEST-1...PASSED\n"
    bc = BabelCodeProblem("cpp/0", "cpp", "", ("\n}",), "", ("0", "1"), "f")
    assert bc.judge(_result(0, ok, seen=True)).passed
    v = bc.judge(_result(0, ok))  # all PASSED lines, exit 0, but the driver never returned
    assert v.status == "failed" and v.error == EARLY_EXIT
    assert bc.judge(_result(0, "TEST-0...PASSED\n")).error == EARLY_EXIT + "; missing test ids ['1']"
    me = MultiPLEProblem("cpp/x", "cpp", "", ("\n}",), "")
    assert me.judge(_result(0, seen=True)).passed
    assert me.judge(_result(0)).error == EARLY_EXIT
    assert HE0.judge(_result(0, seen=True)).passed
    v = HE0.judge(_result(0, err="Traceback ...\nAssertionError\n"))
    assert v.status == "failed" and v.error.startswith(EARLY_EXIT) and v.error.endswith("AssertionError")


def test_babelcode_driver_prepared_for_the_wrapper():
    py, go = ee.babelcode_problem("python"), ee.babelcode_problem("go")
    assert py.test_code.rstrip().endswith("sys.exit(0)") and "sys.exit(0)" not in py.guarded_test_code()
    assert "func quantlabRealMain() {" in go.guarded_test_code() and "func main()" not in go.guarded_test_code()
    assert "func main()" in go.source("")  # what BabelCode itself runs is unchanged


def test_describe_records_the_judge():
    assert Sandbox(isolation="auto").describe()["judge"] == JUDGE == "completion-token v1"


# --------------------------------------------------------------------------------------- sandbox mechanics
def test_token_file_only_for_the_last_step_and_marker_found_past_the_cap(sandbox):
    """Compilers never see the token file; the marker is found even when split over writes and past the
    output cap, and removing it gives back the program's own bytes."""
    emit = ("import os, sys\nt = open('.quantlab_token').read()\nos.unlink('.quantlab_token')\n"
            "sys.stdout.write('A' * 200000)\nsys.stdout.flush()\nm = '\\n' + t + '\\n'\n"
            "for part in (m[:5], m[5:]):\n    sys.stdout.write(part)\n    sys.stdout.flush()\nprint('tail')\n")
    py = tcs.python_interpreter()
    steps = (Step(("sh", "-c", f"test ! -e {sn.TOKEN_FILE}"), "compile"), Step((py, "-c", emit), "run"))
    small = Limits(timeout_s=10.0, cpu_s=10.0, max_output_bytes=1000)
    flood, short = sandbox.run_many([
        Program({}, tuple(Step(s.argv, s.name, small) for s in steps), token=TOKEN),
        Program({}, (Step((py, "-c", emit.replace("200000", "3")), "run"),), token=TOKEN),
    ])
    assert [s.returncode for s in flood.steps] == [0, 0] and flood.last.truncated
    assert flood.token_seen and flood.passed and flood.last.stdout == "A" * 1000
    assert short.passed and short.last.stdout == "AAAtail\n"  # marker removed, bytes restored


# ------------------------------------------------------------------------------------------- HumanEval/0
HE_CHATTY = ("    import sys\n    for _ in range(300):\n        print('x' * 10000)\n        sys.stdout.flush()\n"
             "        os.write(1, b'y' * 10000)\n")
HE_SPY = ("    import os, sys\n    seen = [repr(sys.argv), repr(dict(os.environ)), open('/proc/self/cmdline', 'rb').read().hex(),\n"
          "            open('/proc/self/environ', 'rb').read().hex()]\n"
          "    for root, _, files in os.walk('.'):\n        for f in files:\n"
          "            seen.append(os.path.join(root, f) + ':' + open(os.path.join(root, f), 'rb').read().hex())\n"
          "    for fd in os.listdir('/proc/self/fd'):\n        try:\n"
          "            seen.append(fd + ' -> ' + os.readlink('/proc/self/fd/' + fd))\n        except OSError:\n"
          "            pass\n"
          "    sys.stderr.write('\\n'.join(seen) + '\\n')\n")


def test_humaneval_every_early_exit_fails_and_correct_code_passes(sandbox):
    canonical = HE0.canonical_solution
    cases = [(name, body, "failed") for name, body in ee.HUMANEVAL_EXITS.items()]
    cases += [("canonical", canonical, "passed"), ("chatty canonical", "    import os\n" + HE_CHATTY + canonical, "passed"),
              ("chatty wrong", "    import os\n" + HE_CHATTY + "    return None\n", "failed"),
              ("spy", HE_SPY + canonical, "passed")]
    programs = [HE0.program(body) for _, body, _ in cases]
    results = sandbox.run_many(programs)
    for (name, _, status), prog, res in zip(cases, programs, results):
        verdict = HE0.judge(res)
        assert verdict.status == status, (name, verdict, res.error_text())
        if name in ee.HUMANEVAL_EXITS:  # each of them exits with status 0: only the token tells
            assert res.ok and not res.finished and verdict.error.startswith(EARLY_EXIT), (name, verdict)
        assert prog.token not in res.last.stdout + res.last.stderr
    spy = results[-1]
    assert "main.py" in spy.last.stderr and sn.TOKEN_FILE not in spy.last.stderr  # it looked, and found nothing
    assert "AssertionError" in HE0.judge(results[-2]).error  # flooded stdout, yet the reason is kept
    assert all(r.last.stdout == "" for r in results[-4:])  # HumanEval's stdout is swallowed


# ------------------------------------------------------------------------- compiled + scripted formats
PROBE = {  # code that runs before the harness's main and looks for the token file
    "python": ("import os, sys\nprint('token file' if os.path.exists('.quantlab_token') else 'absent', sys.argv)\n", None),
    "cpp": ("#include <cstdio>\nstruct Probe { Probe() { FILE* f = fopen(\".quantlab_token\", \"r\");\n"
            "  printf(\"%s\\n\", f ? \"token file\" : \"absent\"); } };\n"
            "__attribute__((init_priority(101))) Probe early_probe;  // before default-priority constructors\n"
            "Probe probe;\nint main(int argc, char** argv) {\n  for (int i = 0; i < argc; i++) printf(\"%s\\n\", argv[i]);\n}\n",
            None),
    "java": ("import java.nio.file.*;\nclass Problem {\n  static { System.out.println(Files.exists(Paths.get(\".quantlab_token\"))"
             " ? \"token file\" : \"absent\"); }\n  public static void main(String[] a) { System.out.println(String.join(\" \", a)); }\n}\n",
             None),
    "go": ("package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\nvar probe = look()\n\nfunc look() string {\n"
           "\tif _, err := os.Stat(\".quantlab_token\"); err == nil {\n\t\treturn \"token file\"\n\t}\n\treturn \"absent\"\n}\n\n"
           "func init() { fmt.Println(probe, look(), os.Args) }\n\nfunc main() {\n}\n", None),
    "go_test": ("package probe_test\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\t\"testing\"\n)\n\nvar probe = look()\n\n"
                "func look() string {\n\tif _, err := os.Stat(\".quantlab_token\"); err == nil {\n\t\treturn \"token file\"\n\t}\n"
                "\treturn \"absent\"\n}\n\nfunc init() { fmt.Println(probe, look()) }\n\n"
                "func TestProbe(t *testing.T) { fmt.Println(\"in test\") }\n", "probe_test.go"),
}


@pytest.mark.parametrize("kind", sorted(PROBE))
def test_token_file_is_gone_before_any_program_code_runs(kind, sandbox):
    language = "go" if kind.startswith("go") else kind
    need_toolchain(language)
    src, name = PROBE[kind]
    prog = tcs.get_toolchain(language).program(src, source_name=name, completion_token=True)
    res = sandbox.run(prog)
    assert res.passed, res.error_text()
    assert "absent" in res.last.stdout and "token file" not in res.last.stdout
    assert prog.token not in res.last.stdout + res.last.stderr
    assert not any(prog.token in " ".join(s.argv) for s in prog.steps) and prog.token not in str(prog.env)


def _format_cases() -> list:
    """One param per (format, language, mechanism); the correct solution and one exit per pair run by default."""
    params = []
    for fmt in ("babelcode", "multipl_e"):
        for lang in ee.LANGUAGES:
            names = ["correct", *ee.EXITS[(fmt, lang)]]
            for i, name in enumerate(names):
                marks = () if i <= 1 or lang == "python" else pytest.mark.slow
                params.append(pytest.param(fmt, lang, name, marks=marks, id=f"{fmt}-{lang}-{name}"))
    return params


@pytest.fixture(scope="module")
def format_verdicts(sandbox, request):
    """Verdicts of every selected (format, language, mechanism), run together through ``run_many``."""
    wanted = {tuple(item.callspec.params[k] for k in ("fmt", "lang", "name")) for item in request.session.items
              if getattr(item, "originalname", "") == "test_format_early_exits" and hasattr(item, "callspec")}
    runnable = set()
    for lang in ee.LANGUAGES:
        try:
            tcs.get_toolchain(lang).version()
            runnable.add(lang)
        except ToolchainMissing:
            pass
    todo = sorted(w for w in wanted if w[1] in runnable)
    make = {"babelcode": ee.babelcode_problem, "multipl_e": ee.multipl_e_problem}
    problems = [make[fmt](lang) for fmt, lang, _ in todo]
    completions = [ee.CORRECT[(f, la)] if n == "correct" else ee.EXITS[(f, la)][n] for f, la, n in todo]
    results = sandbox.run_many([p.program(c) for p, c in zip(problems, completions)])
    return {key: (p.judge(r), r) for key, p, r in zip(todo, problems, results)}


@pytest.mark.parametrize("fmt, lang, name", _format_cases())
def test_format_early_exits(fmt, lang, name, format_verdicts):
    need_toolchain(lang)
    verdict, result = format_verdicts[(fmt, lang, name)]
    if name == "correct":
        assert verdict.status == "passed", (verdict, result.error_text())
        return
    assert verdict.status == "failed", (verdict, result.error_text())
    assert not result.finished
    if result.ok:  # exit status 0 (BabelCode: with all TEST lines PASSED): it would have passed before
        assert verdict.error.startswith(EARLY_EXIT), verdict
