"""What the sandbox runs and what it reports: :class:`Limits`, :class:`Step`, :class:`Program`,
:class:`StepResult`, :class:`ProgramResult`.

A :class:`Program` is a set of files written into a fresh work directory plus the steps that run there
one after the other (``compile`` then ``run``, say). Execution stops at the first step that fails
(non-zero exit, a signal, or a timeout), so ``ProgramResult.steps`` may be shorter than
``Program.steps``; :attr:`ProgramResult.ok` is true only when every step exited with code 0.

A *guarded* program (``Program.token`` set, see :mod:`quantlab.execution.sentinel`) must also prove
that its test harness ran to the end: :attr:`ProgramResult.finished` is true only when its wrapper
printed the token, i.e. the real entry point returned normally. A judge passes a guarded program only
when it is ``ok`` *and* ``finished``; an exit with status 0 before that is a failure.
"""
from __future__ import annotations

import re
import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from quantlab.errors import ConfigError

MEMORY_RLIMITS: tuple[str, ...] = ("as", "data")
TOKEN_FILE = ".quantlab_token"  # == sentinel.TOKEN_FILE (the sandbox writes it before the last step)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one step.

    Attributes:
        timeout_s: wall-clock limit; the step's whole process tree is killed when it is exceeded.
        cpu_s: ``RLIMIT_CPU`` in seconds (per process; SIGXCPU at the limit, SIGKILL one second later).
        memory_mb: ``RLIMIT_AS`` or ``RLIMIT_DATA`` in MiB (per process); 0 = no limit.
        memory_rlimit: ``"as"`` (address space; right for Python and C++) or ``"data"`` (data segment;
            for the JVM and Go, whose runtimes reserve huge virtual ranges they never touch).
        file_size_mb: ``RLIMIT_FSIZE`` in MiB (largest file a process may write); 0 = no limit.
        max_processes: ``RLIMIT_NPROC`` (processes + threads) of the sandbox user.
        max_output_bytes: bytes kept per stream (stdout, stderr); the rest is read and dropped.
    """

    timeout_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 2048
    memory_rlimit: str = "as"
    file_size_mb: int = 32
    max_processes: int = 64
    max_output_bytes: int = 65536

    def __post_init__(self) -> None:
        key = "sandbox.limits"
        if self.memory_rlimit not in MEMORY_RLIMITS:
            raise ConfigError(f"{key}.memory_rlimit", f"must be one of {MEMORY_RLIMITS}, got {self.memory_rlimit!r}")
        for name in ("timeout_s", "cpu_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{key}.{name}", f"must be > 0, got {getattr(self, name)!r}")
        for name in ("memory_mb", "file_size_mb"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{key}.{name}", f"must be >= 0 (0 = no limit), got {getattr(self, name)!r}")
        for name in ("max_processes", "max_output_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Step:
    """One command of a program, run with the program's work directory as cwd.

    Attributes:
        argv: the command; ``argv[0]`` is looked up on the sandbox ``PATH`` unless it is a path.
        name: ``compile`` / ``run`` / ... (evaluators look steps up by name).
        limits: this step's limits; ``None`` uses the sandbox's default limits.
    """

    argv: tuple[str, ...]
    name: str = "run"
    limits: Limits | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        if not self.argv or not self.argv[0]:
            raise ConfigError("sandbox.step.argv", f"step {self.name!r} has an empty command")


def check_relative_path(path: str) -> PurePosixPath:
    """``path`` as a relative path that stays inside the work directory.

    Raises:
        ConfigError: for absolute paths, ``..`` components, empty names or NUL bytes.
    """
    p = PurePosixPath(path)
    if not path or "\x00" in path or p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        raise ConfigError("sandbox.program.files", f"file name must be a relative path inside the work dir: {path!r}")
    return p


@dataclass(frozen=True)
class Program:
    """Files written into a fresh temporary work directory, and the steps run there.

    Attributes:
        files: relative path -> content (``str`` is written as UTF-8). Absolute paths and ``..`` are rejected.
        steps: run in order; execution stops at the first failing step.
        env: extra environment variables. Everything else of the host environment is stripped: the program
            sees only ``PATH``, ``HOME`` and ``TMPDIR`` (both the work dir), ``LANG``/``LC_ALL`` = ``C.UTF-8``
            and these.
        token: completion token of a guarded program (``None``: unguarded). The sandbox writes it into
            ``.quantlab_token`` in the work dir just before the *last* step starts (earlier steps, such as
            compilers, never see it), looks for it on that step's stdout and removes it from there.
            Never put it into ``files``, ``env`` or ``argv``: the program could read it there.
    """

    files: Mapping[str, str | bytes]
    steps: tuple[Step, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise ConfigError("sandbox.program.steps", "a program needs at least one step")
        for name, content in self.files.items():
            check_relative_path(name)
            if not isinstance(content, (str, bytes)):
                raise ConfigError("sandbox.program.files", f"{name}: content must be str or bytes")
        for k, v in self.env.items():
            if not k or "=" in k or "\x00" in k or "\x00" in str(v):
                raise ConfigError("sandbox.program.env", f"invalid environment variable {k!r}")
        if self.token is not None:
            if not _TOKEN_RE.match(self.token):
                raise ConfigError("sandbox.program.token", "must be 16-128 characters of [A-Za-z0-9_-]")
            if TOKEN_FILE in self.files:
                raise ConfigError("sandbox.program.files", f"{TOKEN_FILE!r} is reserved for the completion token")


@dataclass(frozen=True)
class StepResult:
    """Outcome of one step.

    Attributes:
        name, argv: as in the :class:`Step`.
        returncode: exit status; ``-N`` when killed by signal ``N`` (also when the sandbox killed it at the
            timeout: ``-9``); ``None`` when the step could not be started at all.
        stdout, stderr: decoded output (UTF-8, undecodable bytes replaced), at most ``max_output_bytes`` each.
        timed_out: the wall-clock limit was reached, or the CPU-time limit (killed by SIGXCPU).
        wall_s: wall-clock seconds from start to the end of the process tree.
        truncated: some output beyond ``max_output_bytes`` was dropped.
        signal: the signal that killed the step's main process, if any.
    """

    name: str
    argv: tuple[str, ...]
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    truncated: bool
    signal: int | None = None

    def status_text(self) -> str:
        """``"timed out after 3.0 s"`` / ``"killed by SIGSEGV"`` / ``"exit code 1"`` / ``"could not start"``."""
        if self.timed_out:
            why = "CPU time limit" if self.signal == _signal.SIGXCPU else f"{self.wall_s:.1f} s"
            return f"timed out ({why})"
        if self.signal is not None:
            try:
                return f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        if self.returncode is None:
            return "could not start"
        return f"exit code {self.returncode}"


@dataclass(frozen=True)
class ProgramResult:
    """Outcome of a :class:`Program`: the results of the steps that ran (stops at the first failure).

    Attributes:
        steps: the steps that ran.
        token: the program's completion token (``None``: the program was not guarded).
        token_seen: the last step printed the token (the sandbox removed it from that step's stdout).
    """

    steps: tuple[StepResult, ...]
    token: str | None = field(default=None, repr=False)
    token_seen: bool = False

    @property
    def ok(self) -> bool:
        """Every step ran and exited with code 0 (says nothing about *why* the last one exited)."""
        return bool(self.steps) and all(s.returncode == 0 and not s.timed_out for s in self.steps)

    @property
    def finished(self) -> bool:
        """The test harness ran to the end: the token was printed (always true when not guarded)."""
        return self.token is None or self.token_seen

    @property
    def passed(self) -> bool:
        """:attr:`ok` and :attr:`finished`: what a judge that only looks at exit statuses should use."""
        return self.ok and self.finished

    @property
    def timed_out(self) -> bool:
        """Some step hit its wall-clock or CPU-time limit."""
        return any(s.timed_out for s in self.steps)

    @property
    def last(self) -> StepResult:
        """The last step that ran (the failing one when not :attr:`ok`)."""
        if not self.steps:
            raise ValueError("no step ran")
        return self.steps[-1]

    def error_text(self, max_chars: int = 2000) -> str:
        """Why the program failed, for humans: failing step, exit status, tail of stderr (or stdout).

        Returns ``""`` when the program :attr:`passed`.
        """
        if self.passed:
            return ""
        if not self.steps:
            return "no step ran"
        last = self.last
        head = f"step '{last.name}' {last.status_text()}"
        if self.ok:
            head = f"step '{last.name}' exited with status 0 before the tests finished (no completion token)"
        if last.truncated:
            head += " (output truncated)"
        body = (last.stderr.strip() or last.stdout.strip())
        if len(body) > max_chars:
            body = "..." + body[-max_chars:]
        return f"{head}: {body}" if body else head
