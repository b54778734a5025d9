"""Per-language build + run recipes for the sandbox: :class:`Toolchain`, :data:`TOOLCHAINS`.

=========  ========================================================  ================================
language   steps                                                      limits (run / compile)
=========  ========================================================  ================================
python     ``run``: ``<python> -B -E -s main.py``                     the Sandbox's default limits
cpp        ``compile``: ``g++ -std=c++17 -O0 main.cpp -o main``       AS 2 GiB / 60 s, AS 2 GiB
           ``run``: ``./main``
java       ``compile``: ``javac -encoding UTF-8 -d . X.java``         DATA 2 GiB, 15 s / 60 s, DATA 2 GiB
           ``run``: ``java -ea -cp . X`` (``X`` = file stem)
go         ``compile``: ``go build -o main main.go``                  DATA 2 GiB / 60 s, DATA 2 GiB, 256 tasks
           (a ``*_test.go`` source: ``go test -c -o main x_test.go``)
           ``run``: ``./main`` (test binary: ``./main -test.paniconexit0``)
=========  ========================================================  ================================

With ``completion_token=True`` the program is *guarded* (:mod:`quantlab.execution.sentinel`): it gets
a random token and a wrapper around its entry point that prints the token only if the entry point
returned normally, so an early ``exit(0)`` is told apart from a finished test run
(:attr:`~quantlab.execution.ProgramResult.finished`). The steps then become
``<python> -B -E -s _quantlab_main.py`` (runs ``main.py`` via ``runpy``),
``g++ ... _quantlab_main.cpp main.cpp -Wl,--wrap=main``, ``javac ... X.java QuantlabMain.java`` +
``java ... QuantlabMain X``, ``go build -o main quantlab_main.go main.go`` (the source's ``func main()``
renamed) and ``go test -c -o main quantlab_main_test.go x_test.go`` (a ``TestMain``).

Notes:

* **python** runs the interpreter that runs quantlab (``sys.executable``; ``QUANTLAB_SANDBOX_PYTHON``
  overrides it, e.g. when it sits in a directory the sandbox uid may not enter and bubblewrap is missing).
  ``-E -s -B`` instead of ``-I``: the environment is stripped anyway, and ``-I`` would drop the script's
  directory from ``sys.path`` so ``extra_files`` modules could not be imported.
* **java**: the run step's class is the source file's stem; without ``source_name`` the file is named
  after the first ``public class`` (BabelCode's driver), else the first top-level class (MultiPL-E's
  ``Problem``), else ``Main``. ``-ea`` because MultiPL-E's tests are ``assert`` statements. ``.jar``
  files among ``extra_files`` go on the class path (MultiPL-E needs ``javatuples``). The JVM reserves
  far more address space than it uses, hence ``memory_rlimit="data"`` plus ``-Xmx`` = half the memory
  limit, serial GC and no perf-data file (fewer threads: they count against ``max_processes``).
* **go**: ``GO111MODULE=off`` (single-file builds need no ``go.mod``; nothing is fetched) and
  ``GOPROXY=off``; ``GOCACHE``/``GOPATH``/``GOTMPDIR`` default to ``$HOME``/``$TMPDIR``, i.e. the work
  dir, so every build starts with an empty, private build cache. Measured here (Go 1.19.8, 2 cores):
  a cold build of a fmt + reflect + math + sort + strings program takes 0.29 s (Debian's Go 1.19 ships
  the standard library precompiled) and 0.06 s with a warm cache, so a shared cache would save ~0.2 s
  per program, not worth letting one untrusted build write cache entries that another program's build
  would trust. Go >= 1.20 no longer ships a precompiled standard library: the same cold build then
  compiles it (4.4 s here, measured with ``go build -a``); if such a Go is used, a cache shared between
  *compile* steps only (never writable by run steps) would be the safe way to get the time back.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from quantlab.errors import ConfigError, DataError
from quantlab.execution import sentinel as sn
from quantlab.execution.isolation import SAFE_PATH
from quantlab.execution.program import Limits, Program, Step, check_relative_path

LANGUAGES: tuple[str, ...] = ("python", "java", "go", "cpp")
_PUBLIC_CLASS = re.compile(r"^[ \t]*public\s+(?:(?:final|abstract|static)\s+)*class\s+([A-Za-z_$][\w$]*)", re.MULTILINE)
_TOP_CLASS = re.compile(r"^(?:(?:public|final|abstract)\s+)*class\s+([A-Za-z_$][\w$]*)", re.MULTILINE)


class ToolchainMissing(DataError):
    """A compiler or runtime is not installed; the message says how to install it."""


def python_interpreter() -> str:
    """The Python that runs sandboxed Python programs (``QUANTLAB_SANDBOX_PYTHON`` or ``sys.executable``)."""
    return os.environ.get("QUANTLAB_SANDBOX_PYTHON") or sys.executable


def _which(tool: str, language: str, hint: str) -> str:
    path = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), SAFE_PATH]))
    if path is None:
        raise ToolchainMissing(f"{language} toolchain: '{tool}' not found on PATH; install it ({hint})")
    return path


@dataclass(frozen=True)
class Toolchain:
    """How to build and run a single-file program of one language in the sandbox.

    Attributes:
        language: ``python`` / ``java`` / ``go`` / ``cpp``.
        source_name: default file name of the source.
        limits: limits of the ``run`` step (Python: ``None`` in the step, i.e. the sandbox's default limits,
            which :attr:`limits` equals by default).
        compile_limits: limits of the ``compile`` step (``None``: no compile step).
        install_hint: how to install the tools (shown by :class:`ToolchainMissing`).
    """

    language: str
    source_name: str
    limits: Limits
    compile_limits: Limits | None = None
    install_hint: str = ""

    def program(self, source: str, extra_files: Mapping[str, str | bytes] | None = None,
                source_name: str | None = None, limits: Limits | None = None, *,
                completion_token: bool = False, swallow_stdout: bool = False,
                go_main: str | None = None) -> Program:
        """The sandbox program that builds (if needed) and runs ``source``.

        Args:
            source: the program text.
            extra_files: more files for the work dir (relative path -> content).
            source_name: file name of ``source`` (Java: the run step runs the class named like its stem;
                Go: a ``*_test.go`` name builds a test binary with ``go test -c``).
            limits: limits of the run step instead of :attr:`limits`.
            completion_token: guard the program (module docstring): the result's ``finished`` then says
                whether the entry point returned normally.
            swallow_stdout: Python, guarded only: the program's stdout goes to ``/dev/null`` (HumanEval).
            go_main: Go ``go build``, guarded only: the function that replaces ``main`` (the caller
                renamed it, e.g. with :func:`~quantlab.execution.sentinel.rename_go_main`); ``None``
                renames the source's last top-level ``func main()`` here.

        Raises:
            ToolchainMissing: the compiler/runtime is not installed.
            ConfigError: a file name clashes with a wrapper file of a guarded program.
            DataError: a guarded Go source without ``func main()`` / ``package`` clause.
        """
        name = source_name or self._default_name(source)
        check_relative_path(name)
        files = {**dict(extra_files or {}), name: source}
        if completion_token:
            clash = sorted(sn.WRAPPER_FILES & set(files))
            if clash:
                raise ConfigError("sandbox.program.files", f"{clash[0]!r} is reserved for the completion-token wrapper")
        guard = _Guard(swallow_stdout, go_main) if completion_token else None
        run_limits = limits or (None if self.language == "python" else self.limits)
        steps, env = _BUILDERS[self.language](self, name, files, run_limits, guard)
        return Program(files=files, steps=tuple(steps), env=env, token=sn.new_token() if guard else None)

    def _default_name(self, source: str) -> str:
        if self.language == "java":
            m = _PUBLIC_CLASS.search(source) or _TOP_CLASS.search(source)
            return f"{m.group(1)}.java" if m else self.source_name
        return self.source_name

    def version(self) -> str:
        """Tool name and version, e.g. ``"g++ 12.2.0"``. Raises :class:`ToolchainMissing`."""
        return _version(self.language, self.install_hint, python_interpreter())


@dataclass(frozen=True)
class _Guard:
    """Options of a guarded program (see :meth:`Toolchain.program`)."""

    swallow_stdout: bool = False
    go_main: str | None = None


def _python(tc: Toolchain, name: str, files: dict, limits: Limits | None,
            guard: _Guard | None) -> tuple[list[Step], dict[str, str]]:
    script = name
    if guard is not None:
        files[sn.PY_WRAPPER] = sn.python_wrapper(name, guard.swallow_stdout)
        script = sn.PY_WRAPPER
    return [Step((python_interpreter(), "-B", "-E", "-s", script), "run", limits)], {}  # None: sandbox defaults


def _cpp(tc: Toolchain, name: str, files: dict, limits: Limits | None,
         guard: _Guard | None) -> tuple[list[Step], dict[str, str]]:
    gxx = _which("g++", tc.language, tc.install_hint)
    sources: tuple[str, ...] = (name,)
    if guard is not None:  # the wrapper first: its .preinit_array entry runs first
        files[sn.CPP_WRAPPER_NAME] = sn.CPP_WRAPPER
        sources = (sn.CPP_WRAPPER_NAME, name, "-Wl,--wrap=main")
    return [Step((gxx, "-std=c++17", "-O0", *sources, "-o", "main"), "compile", tc.compile_limits),
            Step(("./main",), "run", limits)], {}


def _jvm_flags(limits: Limits | None, prefix: str = "", c1_only: bool = False) -> list[str]:
    """Serial GC, no perf-data file, ``-Xmx`` = half the memory limit (``c1_only``: fast start for javac)."""
    flags = ["-XX:+UseSerialGC", "-XX:-UsePerfData"] + (["-XX:TieredStopAtLevel=1"] if c1_only else [])
    if limits is not None and limits.memory_mb:
        flags.append(f"-Xmx{max(64, limits.memory_mb // 2)}m")
    return [prefix + f for f in flags]


def _java(tc: Toolchain, name: str, files: dict, limits: Limits | None,
          guard: _Guard | None) -> tuple[list[Step], dict[str, str]]:
    javac = _which("javac", tc.language, tc.install_hint)
    java = _which("java", tc.language, tc.install_hint)
    cls = PurePosixPath(name).stem
    cp = ":".join(["."] + sorted(f for f in files if f.endswith(".jar")))
    sources: tuple[str, ...] = (name,)
    main: tuple[str, ...] = (cls,)
    if guard is not None:
        files[f"{sn.JAVA_WRAPPER_CLASS}.java"] = sn.JAVA_WRAPPER
        sources, main = (name, f"{sn.JAVA_WRAPPER_CLASS}.java"), (sn.JAVA_WRAPPER_CLASS, cls)
    compile_ = (javac, *_jvm_flags(tc.compile_limits, "-J", c1_only=True), "-encoding", "UTF-8", "-cp", cp,
                "-d", ".", *sources)
    run = (java, *_jvm_flags(limits), "-ea", "-cp", cp, *main)
    return [Step(compile_, "compile", tc.compile_limits), Step(run, "run", limits)], {}


def _go(tc: Toolchain, name: str, files: dict, limits: Limits | None,
        guard: _Guard | None) -> tuple[list[Step], dict[str, str]]:
    go = _which("go", tc.language, tc.install_hint)
    env = {"GO111MODULE": "off", "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": "-p=2"}
    test = name.endswith("_test.go")
    sources: tuple[str, ...] = (name,)
    if guard is not None and test:  # listed first: its package variable is initialized first
        files[sn.GO_TEST_WRAPPER_NAME] = sn.go_test_wrapper(sn.go_package(files[name], where=name))
        sources = (sn.GO_TEST_WRAPPER_NAME, name)
    elif guard is not None:
        if guard.go_main is None:
            files[name] = sn.rename_go_main(files[name], where=name)
        files[sn.GO_WRAPPER_NAME] = sn.go_main_wrapper(guard.go_main or sn.GO_REAL_MAIN)
        sources = (sn.GO_WRAPPER_NAME, name)
    build = (go, "test", "-c") if test else (go, "build")
    run = ("./main", "-test.paniconexit0") if test else ("./main",)  # the flag `go test` passes (Go >= 1.16)
    return [Step((*build, "-o", "main", *sources), "compile", tc.compile_limits), Step(run, "run", limits)], env


_BUILDERS = {"python": _python, "cpp": _cpp, "java": _java, "go": _go}


@functools.cache
def _version(language: str, hint: str, python: str) -> str:
    if language == "python":
        cmd, tool = [python, "-c", "import platform; print(platform.python_version())"], "python"
    elif language == "cpp":
        cmd, tool = [_which("g++", language, hint), "-dumpfullversion"], "g++"
    elif language == "java":
        cmd, tool = [_which("javac", language, hint), "-version"], "javac"
        _which("java", language, hint)
    else:
        cmd, tool = [_which("go", language, hint), "version"], "go"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolchainMissing(f"{language} toolchain: '{cmd[0]}' does not run ({e}); install it ({hint})") from e
    text = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or not text:
        raise ToolchainMissing(f"{language} toolchain: '{' '.join(cmd)}' failed: {text[-300:]} ({hint})")
    words = text.split()
    if language == "go":
        ver = next((w[2:] for w in words if w.startswith("go1")), words[-1])
    else:
        ver = words[-1] if language != "java" else words[1] if len(words) > 1 else words[-1]
    return f"{tool} {ver}"


_DATA: dict[str, Any] = {"memory_rlimit": "data"}
TOOLCHAINS: dict[str, Toolchain] = {
    "python": Toolchain("python", "main.py", Limits(), None, "a Python >= 3.10 interpreter"),
    "cpp": Toolchain("cpp", "main.cpp", Limits(), Limits(timeout_s=60.0, cpu_s=60.0),
                     "apt-get install g++"),
    "java": Toolchain("java", "Main.java", Limits(timeout_s=15.0, cpu_s=30.0, **_DATA),
                      Limits(timeout_s=60.0, cpu_s=60.0, **_DATA), "apt-get install default-jdk-headless"),
    "go": Toolchain("go", "main.go", Limits(**_DATA),
                    Limits(timeout_s=60.0, cpu_s=60.0, max_processes=256, **_DATA), "apt-get install golang-go"),
}


def get_toolchain(language: str) -> Toolchain:
    """The :class:`Toolchain` of ``language`` (ConfigError naming the valid ones otherwise)."""
    try:
        return TOOLCHAINS[language]
    except KeyError:
        raise ConfigError("language", f"no toolchain for {language!r}; valid: {sorted(TOOLCHAINS)}") from None


def with_run_limits(program: Program, **changes) -> Program:
    """``program`` with the ``run`` step's limits changed (e.g. ``timeout_s=3.0``)."""
    steps = tuple(replace(s, limits=replace(s.limits or Limits(), **changes)) if s.name == "run" else s
                  for s in program.steps)
    return replace(program, steps=steps)
