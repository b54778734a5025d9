"""The self-check's ``early_exit`` group: completions that end the process early must be judged failed.

Every mechanism that a completion can reach to end its process with status 0 before the test harness
is done (:mod:`quantlab.execution.sentinel` explains the defence) is run through the real
``problem.program`` / ``problem.judge`` of each dataset and format:

* HumanEval/0 (Python check program): ``exit()``, ``quit()``, ``sys.exit(0)``, ``os._exit(0)``,
  ``raise SystemExit``, ``sys.exit`` at module level, an ``atexit`` handler, a ``sys.excepthook``,
  a thread, a ``SIGALRM`` handler, ``SIGTERM`` to itself with a handler, ``exec`` of ``/bin/true``;
* hand-made BabelCode-format and MultiPL-E-format problems (sum of squares; their shape follows
  ``tests/fixtures/{babelcode,multipl_e}``) in Python, Java (``System.exit``, ``Runtime.halt``, exit
  in a static initializer, a shutdown hook), Go (``os.Exit`` in the function, in ``init()``, in a
  goroutine) and C++ (``exit``, ``quick_exit``, ``_Exit``, ``std::exit`` from a static object's
  constructor, a ``SIGABRT`` handler). The BabelCode completions first print the ``TEST-i...PASSED``
  lines themselves, the MultiPL-E ones fail an assertion or exit before the tests: every one of them
  was judged *passed* before completion tokens (exit status 0, and for BabelCode all ids ``PASSED``).

The Go problems import ``os`` (BabelCode's Go header and MultiPL-E's Go prompts do not, so there a
completion cannot even name ``os.Exit``); a program written whole by a model could. The correct
solution of every hand-made problem must still pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LANGUAGES: tuple[str, ...] = ("python", "java", "go", "cpp")
_TESTS: tuple[tuple[list[int], int], ...] = (([1, 2, 3], 14), ([], 0), ([-2, 5], 29))
_FAKE = "TEST-0...PASSED\\nTEST-1...PASSED\\nTEST-2...PASSED\\n"  # escaped: goes into source code


def _join(items, fmt: str, suffix: str = "") -> str:
    """One line per test case: ``fmt`` with ``{i}`` (index), ``{a}`` (the list's items + ``suffix``), ``{e}``."""
    return "\n".join(fmt.format(i=i, a=", ".join(f"{x}{suffix}" for x in a), e=e) for i, (a, e) in enumerate(items))


# ------------------------------------------------------------------------------ BabelCode-format rows
_BC_TEST_CODE = {
    "python": "import sys\nfrom typing import List\n\nPLACEHOLDER_CODE_BODY\n\n"
              "def driver(nums, expected):\n    try:\n        if PLACEHOLDER_FN_NAME(nums) == expected:\n"
              '            return "PASSED"\n        return "FAILED"\n    except Exception as exception_obj:\n'
              '        return type(exception_obj).__name__\n\nif __name__ == "__main__":\n'
              + _join(_TESTS, '    result = driver([{a}], {e})\n    print(f"TEST-{i}...{{result}}")') + "\n    sys.exit(0)\n",
    "java": "import java.util.*;\n\nclass QuestionEvaluator {\n"
            "    public static String validateSolution(ArrayList<Integer> nums, Integer expected){\n"
            "        try{\n            if (new Driver().run(nums, expected)){\n                return \"PASSED\";\n"
            "            }\n            return \"FAILED\";\n        } catch (Exception exception_obj){\n"
            "            return exception_obj.getClass().getSimpleName();\n        }\n    }\n"
            "    public static void main(String[] args) {\n        String result;\n"
            + _join(_TESTS, "        result = validateSolution(new ArrayList<>(Arrays.asList({a})), {e});\n"
                            '        System.out.println(String.format("%s%s","TEST-{i}...",result));')
            + "\n    }\n}\n\nclass Driver{\n    public boolean run(ArrayList<Integer> nums, Integer expected){\n"
            "        PLACEHOLDER_CLS_NAME sol = new PLACEHOLDER_CLS_NAME();\n"
            "        return sol.PLACEHOLDER_FN_NAME(nums).equals(expected);\n    }\n}\n\nPLACEHOLDER_CODE_BODY\n",
    "go": 'package main\n\nimport (\n    "fmt"\n    "os"\n    "reflect"\n)\n\nPLACEHOLDER_CODE_BODY\n\n'
          "func driver(nums []int, expected int) string {\n"
          "    if reflect.DeepEqual(PLACEHOLDER_FN_NAME(nums), expected) {\n"
          '        return "PASSED"\n    }\n    return "FAILED"\n}\n\nvar _ = os.Exit\n\n'
          'func main() {\n    result := ""\n'
          + _join(_TESTS, '    result = driver([]int{{{a}}}, {e})\n    fmt.Printf("TEST-{i}...%s\\n", result)') + "\n}\n",
    "cpp": "#include <bits/stdc++.h>\nusing namespace std;\n\nPLACEHOLDER_CODE_BODY\n\n"
           "string driver(vector<int> nums, int expected){\n    try\n    {\n"
           '        if (PLACEHOLDER_FN_NAME(nums) == expected){\n            return "PASSED";\n        }\n'
           '        return "FAILED";\n    }\n    catch (...)\n    {\n        return "UNK_ERROR";\n    }\n}\n\n'
           'int main() {\n    string result = "";\n'
           + _join(_TESTS, '    result = driver({{{a}}}, {e});\n    cout << "TEST-" << {i} << "..." << result << "\\n";')
           + "\n    return 0;\n}\n",
}
_BC_PROMPT = {
    "python": 'def sum_of_squares(nums: List[int]) -> int:\n    """Return the sum of the squares of nums."""',
    "java": "class Solution {\n    public Integer sumOfSquares(ArrayList<Integer> nums) {",
    "go": "func sumOfSquares(nums []int) int {",
    "cpp": "int sumOfSquares(vector<int> nums) {",
}
_BC_LANGUAGE = {"python": "Python", "java": "Java", "go": "Go", "cpp": "C++"}

# ------------------------------------------------------------------------------ MultiPL-E-format rows
_ME_PROMPT = {
    "python": 'from typing import List\n\ndef sum_of_squares(nums: List[int]) -> int:\n    """ Sum of squares. """\n',
    "java": "import java.util.*;\nclass Problem {\n    public static long sumOfSquares(ArrayList<Long> nums) {\n",
    "go": 'package sum_of_squares_test\n\nimport (\n    "testing"\n    "fmt"\n    "os"\n)\n\n'
          "func sum_of_squares(nums []int) int {\n",
    "cpp": "#include<assert.h>\n#include<bits/stdc++.h>\nlong sum_of_squares(std::vector<long> nums) {\n",
}
_ME_TESTS = {
    "python": "def check(candidate):\n" + _join(_TESTS, "    assert candidate([{a}]) == {e}")
              + "\n\ndef test_check():\n    check(sum_of_squares)\n\ntest_check()\n",
    "java": "    }\n    public static void main(String[] args) {\n"
            + _join(_TESTS, "    assert(sumOfSquares(new ArrayList<Long>(Arrays.asList(new Long[]{{{a}}}))) == {e}L);", "L")
            + "\n    }\n\n}\n",
    "go": "var _ = os.Exit\n\nfunc TestSum_Of_Squares(t *testing.T) {\n  candidate := sum_of_squares\n"
          "\ttype test struct {\n\t\tactual   interface{}\n\t\texpected interface{}\n\t}\n   tests := []test{\n"
          + _join(_TESTS, "     {{ actual: candidate([]int{{{a}}}), expected: {e} }},") + "\n   }\n\n"
          "\tfor i, tc := range tests {\n\t\tt.Run(fmt.Sprintf(\"test num % d\", i), func(t *testing.T) {\n"
          "\t\t\tif fmt.Sprintf(\"%v\", tc.actual) != fmt.Sprintf(\"%v\", tc.expected) {\n"
          "\t\t\t\tt.Errorf(\"expected '%v', got '%v'\", tc.expected, tc.actual)\n\t\t\t}\n\t\t})\n\t}\n}\n\n",
    "cpp": "}\nint main() {\n    auto candidate = sum_of_squares;\n"
           + _join(_TESTS, "    assert(candidate((std::vector<long>({{{a}}}))) == ({e}));") + "\n}\n",
}
_ME_LANGUAGE = {"python": "py", "java": "java", "go": "go_test.go", "cpp": "cpp"}

# --------------------------------------------------------------------------------------- completions
CORRECT: dict[tuple[str, str], str] = {
    ("babelcode", "python"): "\n    return sum(x * x for x in nums)\n",
    ("babelcode", "java"): "\n        int total = 0;\n        for (int x : nums) {\n            total += x * x;\n"
                           "        }\n        return total;\n    }\n}\n",
    ("babelcode", "go"): "\n    total := 0\n    for _, x := range nums {\n        total += x * x\n    }\n    return total\n}\n",
    ("babelcode", "cpp"): "\n    int total = 0;\n    for (int x : nums) total += x * x;\n    return total;\n}\n",
    ("multipl_e", "python"): "    return sum(x * x for x in nums)\n",
    ("multipl_e", "java"): "        long total = 0;\n        for (long x : nums) {\n            total += x * x;\n"
                           "        }\n        return total;\n",
    ("multipl_e", "go"): "    total := 0\n    for _, x := range nums {\n        total += x * x\n    }\n    return total\n}\n\n",
    ("multipl_e", "cpp"): "    long total = 0;\n    for (long x : nums) total += x * x;\n    return total;\n",
}
HUMANEVAL_EXITS: dict[str, str] = {  # bodies of has_close_elements (HumanEval/0)
    "exit()": "    exit(0)\n",
    "quit()": "    quit(0)\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit(0)\n",
    "module-level sys.exit": "    return True\n\nimport sys\nsys.exit(0)\n",
    "atexit handler": "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return None\n",
    "sys.excepthook": "    import os, sys\n    sys.excepthook = lambda *a: os._exit(0)\n    return None\n",
    "thread os._exit": "    import os, threading, time\n    threading.Thread(target=lambda: os._exit(0)).start()\n"
                       "    time.sleep(2)\n    return None\n",
    "SIGALRM handler": "    import os, signal\n    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                       "    signal.setitimer(signal.ITIMER_REAL, 0.2)\n    while True:\n        pass\n",
    "SIGTERM to self": "    import os, signal, sys\n    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                       "    os.kill(os.getpid(), signal.SIGTERM)\n    return None\n",
    "exec /bin/true": "    import os\n    os.execv('/bin/true', ['true'])\n",
}
_PY_FAKE = f"\n    print('{_FAKE}', end='', flush=True)"
_JAVA_FAKE = f'\n        System.out.print("{_FAKE}");'
_GO_FAKE = f'\n    fmt.Print("{_FAKE}")'
_CPP_FAKE = f'\n    std::cout << "{_FAKE}" << std::flush;'
EXITS: dict[tuple[str, str], dict[str, str]] = {
    ("babelcode", "python"): {
        "sys.exit(0)": _PY_FAKE + "\n    import sys\n    sys.exit(0)\n",
        "os._exit(0)": _PY_FAKE + "\n    import os\n    os._exit(0)\n",
        "atexit handler": _PY_FAKE + "\n    import atexit, os, sys\n    sys.stderr = open(os.devnull, 'w')\n"
                                     "    atexit.register(lambda: os._exit(0))\n    raise BaseException('x')\n",
    },
    ("multipl_e", "python"): {
        "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
        "os._exit(0)": "    import os\n    os._exit(0)\n",
        "atexit handler": "    import atexit, os\n    atexit.register(lambda: os._exit(0))\n    return 0\n",
    },
    ("babelcode", "java"): {
        "System.exit(0)": _JAVA_FAKE + "\n        System.exit(0);\n        return 0;\n    }\n}\n",
        "Runtime.halt(0)": _JAVA_FAKE + "\n        Runtime.getRuntime().halt(0);\n        return 0;\n    }\n}\n",
        "static initializer": "\n        return 0;\n    }\n    static {" + _JAVA_FAKE + "\n        System.exit(0);\n    }\n}\n",
        "shutdown hook": _JAVA_FAKE + "\n        System.setErr(new java.io.PrintStream(java.io.OutputStream.nullOutputStream()));"
                         "\n        Runtime.getRuntime().addShutdownHook(new Thread(() -> Runtime.getRuntime().halt(0)));"
                         "\n        throw new Error(\"early\");\n    }\n}\n",
    },
    ("multipl_e", "java"): {
        "System.exit(0)": "        System.exit(0);\n        return 0L;\n",
        "Runtime.halt(0)": "        Runtime.getRuntime().halt(0);\n        return 0L;\n",
        "static initializer": "        return 0L;\n    }\n    static {\n        System.exit(0);\n    }\n"
                              "    static void quantlabPad() {\n",
        "shutdown hook": "        Runtime.getRuntime().addShutdownHook(new Thread(() -> Runtime.getRuntime().halt(0)));\n"
                         "        return 0L;\n",
    },
    ("babelcode", "go"): {
        "os.Exit(0)": _GO_FAKE + "\n    os.Exit(0)\n    return 0\n}\n",
        "os.Exit(0) in init()": "\n    return 0\n}\n\nfunc init() {" + _GO_FAKE + "\n    os.Exit(0)\n}\n",
        "os.Exit(0) in a goroutine": _GO_FAKE + "\n    go func() { os.Exit(0) }()\n    select {}\n}\n",
    },
    ("multipl_e", "go"): {
        "os.Exit(0)": "    os.Exit(0)\n    return 0\n}\n\n",
        "os.Exit(0) in init()": "    return 0\n}\n\nfunc init() {\n    os.Exit(0)\n}\n\n",
        "os.Exit(0) in a goroutine": "    go func() { os.Exit(0) }()\n    select {}\n}\n\n",
    },
    ("babelcode", "cpp"): {
        "exit(0)": _CPP_FAKE + "\n    exit(0);\n}\n",
        "quick_exit(0)": _CPP_FAKE + "\n    quick_exit(0);\n}\n",
        "_Exit(0)": _CPP_FAKE + "\n    _Exit(0);\n}\n",
        "std::exit in a static constructor": "\n    return 0;\n}\nstruct QuantlabEarly {\n    QuantlabEarly() {"
                                             + _CPP_FAKE + "\n        std::exit(0);\n    }\n} quantlab_early;\n",
        "SIGABRT handler": _CPP_FAKE + "\n    signal(SIGABRT, [](int) { _Exit(0); });\n    abort();\n}\n",
    },
    ("multipl_e", "cpp"): {
        "exit(0)": "    exit(0);\n",
        "quick_exit(0)": "    quick_exit(0);\n",
        "_Exit(0)": "    _Exit(0);\n",
        "std::exit in a static constructor": "    return 0;\n}\nstruct QuantlabEarly {\n"
                                             "    QuantlabEarly() { std::exit(0); }\n} quantlab_early;\n"
                                             "long quantlab_pad() {\n    return 0;\n",
        "SIGABRT handler": "    signal(SIGABRT, [](int) { _Exit(0); });\n    return 0;\n",
    },
}


def babelcode_problem(language: str) -> Any:
    """The hand-made BabelCode-format problem (``BabelCodeProblem``) of ``language``."""
    from quantlab.evals.code.babelcode import problem_from_row

    fn = "sum_of_squares" if language == "python" else "sumOfSquares"
    row = {"qid": "quantlab-exit", "language": _BC_LANGUAGE[language], "signature_with_docstring": _BC_PROMPT[language],
           "question_info": {"test_code": _BC_TEST_CODE[language], "test_case_ids": ["0", "1", "2"],
                             "entry_fn_name": fn, "entry_cls_name": "Solution", "timeouts": [10]}}
    return problem_from_row(row, f"quantlab.execution.earlyexit:babelcode/{language}")


def multipl_e_problem(language: str) -> Any:
    """The hand-made MultiPL-E-format problem (``MultiPLEProblem``) of ``language``."""
    from quantlab.evals.code.multipl_e import problem_from_row

    row = {"name": "QL_exit_sum_of_squares", "language": _ME_LANGUAGE[language], "prompt": _ME_PROMPT[language],
           "tests": _ME_TESTS[language], "stop_tokens": None}
    return problem_from_row(row, f"quantlab.execution.earlyexit:multipl_e/{language}")


def cases(humaneval_problem: Any, languages: Sequence[str] = LANGUAGES) -> list[tuple[str, str, Any, str, bool]]:
    """``(language, check name, problem, completion, must pass)`` of the group, for ``languages``."""
    out = []
    if "python" in languages:
        out += [("python", f"humaneval/python {name}", humaneval_problem, body, False)
                for name, body in HUMANEVAL_EXITS.items()]
    for fmt, make in (("babelcode", babelcode_problem), ("multipl_e", multipl_e_problem)):
        for lang in languages:
            problem = make(lang)
            out.append((lang, f"{fmt}/{lang} correct solution passes", problem, CORRECT[(fmt, lang)], True))
            out += [(lang, f"{fmt}/{lang} {name}", problem, body, False) for name, body in EXITS[(fmt, lang)].items()]
    return out


def early_exit_checks(sandbox: Any, humaneval_problem: Any,
                      languages: Sequence[str] = LANGUAGES) -> list[tuple[str, str, str]]:
    """Run the group: ``(check name, status, detail)`` rows, status ``pass`` / ``fail`` / ``skipped``.

    An early exit passes the check when it is judged failed (not timed out: every one of them ends
    well within the limit); a correct solution when it is judged passed. Languages whose toolchain is
    missing are ``skipped`` (one row each, saying how to install it).
    """
    from quantlab.execution.toolchains import ToolchainMissing, get_toolchain

    rows, todo = [], []
    for lang in languages:
        try:
            get_toolchain(lang).version()
        except ToolchainMissing as e:
            rows.append((f"{lang} (all formats)", "skipped", str(e)))
            continue
        todo.append(lang)
    selected = cases(humaneval_problem, todo)
    results = sandbox.run_many([problem.program(completion) for _, _, problem, completion, _ in selected])
    for (_, name, problem, _, must_pass), result in zip(selected, results):
        verdict = problem.judge(result)
        ok = verdict.status == ("passed" if must_pass else "failed")
        how = result.last.status_text() + ("" if result.finished else ", no token")
        detail = f"{verdict.status}: {verdict.error or how}" if not ok else f"{verdict.status} ({how})"
        rows.append((name, "pass" if ok else "fail", detail))
    return rows
