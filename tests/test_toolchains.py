"""Per-language toolchains (quantlab.execution.toolchains) run in the sandbox: correct, wrong, compile
error and hostile programs. Missing compilers skip these tests, or fail them when
QUANTLAB_REQUIRE_SANDBOX=1 (CI installs g++, a JDK and Go)."""
from __future__ import annotations

import os
import re
import shutil

import psutil
import pytest

from quantlab.errors import ConfigError
from quantlab.execution import Limits, Sandbox, ToolchainMissing, get_toolchain
from quantlab.execution import isolation as iso
from quantlab.execution import toolchains as tcs

REQUIRE = os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1"

OK_SRC = {
    "python": "import sys\nassert sorted([3, 1, 2]) == [1, 2, 3]\nprint('ok', sys.argv[0])\n",
    "cpp": "#include <bits/stdc++.h>\nint main() { std::vector<long> v{3, 1, 2}; std::sort(v.begin(), v.end());\n"
           "  assert(v[0] == 1); std::cout << \"ok\" << std::endl; }\n",
    "java": "import java.util.*;\nclass Problem {\n  public static void main(String[] a) {\n"
            "    List<Long> l = new ArrayList<>(Arrays.asList(3L, 1L, 2L)); Collections.sort(l);\n"
            "    assert l.get(0) == 1L; System.out.println(\"ok\");\n  }\n}\n",
    "go": "package main\n\nimport (\n\t\"fmt\"\n\t\"math\"\n\t\"reflect\"\n\t\"sort\"\n)\n\nfunc main() {\n"
          "\ta := []int{3, 1, 2}\n\tsort.Ints(a)\n\tif !reflect.DeepEqual(a, []int{1, 2, 3}) || math.Abs(-1) != 1 {\n"
          "\t\tpanic(\"wrong\")\n\t}\n\tfmt.Println(\"ok\")\n}\n",
}
WRONG_SRC = {  # an assertion that fails at run time (MultiPL-E style)
    "python": "assert sorted([3, 1, 2]) == [3, 2, 1]\n",
    "cpp": "#include <cassert>\nint main() { int x = 1; assert(x == 2); }\n",
    "java": "class Problem {\n  public static void main(String[] a) {\n    long x = 1;\n    assert x == 2;\n  }\n}\n",
    "go": "package main\n\nimport \"os\"\n\nfunc main() {\n\tos.Exit(1)\n}\n",
}
COMPILE_ERROR = {
    "cpp": ("int main() { return undefined_name; }\n", "undefined_name"),
    "java": ("class Problem {\n  public static void main(String[] a) { int x = \"s\"; }\n}\n", "incompatible types"),
    "go": ("package main\n\nfunc main() {\n\tx := 1\n}\n", "declared but not used"),
}


def need_toolchain(language: str) -> None:
    """Skip when ``language``'s tools are missing, fail instead when QUANTLAB_REQUIRE_SANDBOX=1."""
    try:
        get_toolchain(language).version()
    except ToolchainMissing as e:
        (pytest.fail if REQUIRE else pytest.skip)(str(e))


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(Limits(timeout_s=10.0, cpu_s=10.0), isolation="auto", workers=2)
    with pytest.MonkeyPatch.context() as mp:
        # root without bubblewrap: the sandbox uid must be able to reach the Python interpreter
        if sb.isolation == "none" and iso.is_root() and not iso.reachable_by_others(tcs.python_interpreter()):
            alt = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
            if alt and iso.reachable_by_others(alt):
                mp.setenv("QUANTLAB_SANDBOX_PYTHON", alt)
        yield sb


@pytest.mark.parametrize("language", tcs.LANGUAGES)
def test_correct_and_wrong_program(language, sandbox):
    need_toolchain(language)
    tc = get_toolchain(language)
    ok, wrong = sandbox.run_many([tc.program(OK_SRC[language]), tc.program(WRONG_SRC[language])])
    assert ok.ok, ok.error_text()
    assert ok.last.name == "run" and ok.last.stdout.startswith("ok")
    assert [s.name for s in ok.steps] == (["run"] if language == "python" else ["compile", "run"])
    assert not wrong.ok and not wrong.timed_out and wrong.last.name == "run" and wrong.last.returncode != 0
    if language == "java":
        assert "AssertionError" in wrong.last.stderr  # -ea is on
    assert re.fullmatch(r"[a-z+]+ \d+\.\d+(\.\d+)?\S*", tc.version()), tc.version()


@pytest.mark.parametrize("language", sorted(COMPILE_ERROR))
def test_compile_error_is_a_failure_with_the_message(language, sandbox):
    need_toolchain(language)
    src, message = COMPILE_ERROR[language]
    r = sandbox.run(get_toolchain(language).program(src))
    assert not r.ok and not r.timed_out and len(r.steps) == 1 and r.last.name == "compile"
    assert r.error_text().startswith("step 'compile' exit code") and message in r.error_text()


def test_cpp_hostile_loop_and_fork_exec():
    need_toolchain("cpp")
    sb = Sandbox(isolation="auto", workers=2)
    name = f"qlcpp{os.getpid() % 10**6}"
    bomb = ("#include <unistd.h>\n#include <sys/prctl.h>\n#include <cstdlib>\nint main() {\n"
            f"  prctl(PR_SET_NAME, \"{name}\");\n  system(\"sleep 1000 &\");\n"
            "  if (fork() == 0) { setsid(); execl(\"/bin/sleep\", \"sleep\", \"1001\", (char*)0); }\n"
            "  while (true) { fork(); }\n}\n")
    tc = get_toolchain("cpp")
    fast = Limits(timeout_s=2.0, cpu_s=2.0)  # run step only; compiling keeps the toolchain's limits
    loop, forker = sb.run_many([
        tc.program("int main() { volatile long i = 0; while (true) { i++; } }\n", limits=fast),
        tc.program(bomb, limits=fast),
    ])
    assert [s.name for s in loop.steps] == ["compile", "run"] and loop.timed_out and not loop.ok
    assert loop.last.wall_s < 5.0  # the 2 s run limit; measured 2.0-2.1 s
    assert forker.timed_out and not forker.ok and forker.last.name == "run"
    left = [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == name or (p.info["cmdline"] or [])[:2] in (["sleep", "1000"], ["sleep", "1001"])
            and p.uids().real != os.getuid()]
    assert left == []


def test_java_huge_allocation_and_class_names(sandbox):
    need_toolchain("java")
    tc = get_toolchain("java")
    driver = ("class Solution {\n  int f() { return 1; }\n}\npublic class Main {\n"
              "  public static void main(String[] a) { System.out.println(new Solution().f()); }\n}\n")
    hog = "class Problem {\n  public static void main(String[] a) {\n    long[] x = new long[Integer.MAX_VALUE - 8];\n"
    hog += "    System.out.println(x.length);\n  }\n}\n"
    named = "class Renamed {\n  public static void main(String[] a) { System.out.println(\"named\"); }\n}\n"
    assert tc.program(driver).steps[-1].argv[-1] == "Main" and "Main.java" in tc.program(driver).files
    assert "Problem.java" in tc.program(hog).files
    progs = [tc.program(driver), tc.program(hog), tc.program(named, source_name="Renamed.java")]
    drv, mem, ren = sandbox.run_many(progs)
    assert drv.ok and drv.last.stdout == "1\n", drv.error_text()
    assert not mem.ok and not mem.timed_out and "OutOfMemoryError" in mem.last.stderr
    assert ren.ok and ren.last.stdout == "named\n", ren.error_text()


def test_go_huge_allocation(sandbox):
    need_toolchain("go")
    src = "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tx := make([]byte, 1<<40)\n\tfmt.Println(len(x))\n}\n"
    r = sandbox.run(get_toolchain("go").program(src))
    assert not r.ok and not r.timed_out and r.last.name == "run" and "out of memory" in r.last.stderr


def test_registry_errors_and_helpers(monkeypatch):
    with pytest.raises(ConfigError, match="valid: .*'cpp'.*'go'.*'java'.*'python'"):
        get_toolchain("rust")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    tcs._version.cache_clear()
    try:
        with pytest.raises(ToolchainMissing, match="apt-get install golang-go"):
            get_toolchain("go").program("package main\nfunc main() {}\n")
        with pytest.raises(ToolchainMissing, match="apt-get install g\\+\\+"):
            get_toolchain("cpp").version()
    finally:
        tcs._version.cache_clear()
    p = tcs.with_run_limits(get_toolchain("python").program("print(1)"), timeout_s=3.0)
    assert p.steps[0].limits.timeout_s == 3.0
    assert get_toolchain("java").limits.memory_rlimit == "data" and get_toolchain("go").limits.memory_rlimit == "data"
