"""The sandboxed executor (quantlab.execution): results, limits, containment, fallback, self-check.

Every containment test runs in each isolation mode available here ("bwrap" and "none"). With
QUANTLAB_REQUIRE_SANDBOX=1 (CI) a missing bubblewrap fails the tests instead of skipping them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import time

import psutil
import pytest

from quantlab.errors import ConfigError
from quantlab.execution import Limits, Program, Sandbox, Step, get_toolchain
from quantlab.execution import isolation as iso
from quantlab.execution.selfcheck import check_program, load_problems, run_selfcheck

REQUIRE = os.environ.get("QUANTLAB_REQUIRE_SANDBOX") == "1"
FAST = Limits(timeout_s=3.0, cpu_s=3.0)


def need(ok: bool, reason: str) -> None:
    """Skip when ``ok`` is false, or fail when QUANTLAB_REQUIRE_SANDBOX=1 (CI must have everything)."""
    if not ok:
        (pytest.fail if REQUIRE else pytest.skip)(reason)


def _python_for_none_mode(monkeypatch) -> None:
    """As root without bubblewrap the sandbox uid must reach the interpreter; pick one it can."""
    from quantlab.execution.toolchains import python_interpreter

    if not iso.is_root() or iso.reachable_by_others(python_interpreter()):
        return
    alt = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if alt is None or not iso.reachable_by_others(alt):
        pytest.skip("no Python interpreter reachable by the sandbox uid")
    monkeypatch.setenv("QUANTLAB_SANDBOX_PYTHON", alt)


@pytest.fixture(params=["bwrap", "none"])
def mode(request, monkeypatch) -> str:
    if request.param == "bwrap":
        info = iso.detect_bwrap(os.geteuid())
        need(info.usable, f"bubblewrap not usable: {info.reason}")
    else:
        _python_for_none_mode(monkeypatch)
    return request.param


def py(src: str) -> Program:
    return get_toolchain("python").program(src)


def box(mode: str, limits: Limits = FAST, workers: int = 2) -> Sandbox:
    return Sandbox(limits, isolation=mode, workers=workers)


def _marked(name: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == name[:15] or name in " ".join(p.info["cmdline"] or [])]


# --------------------------------------------------------------------------------------------- API
def test_config_validation():
    with pytest.raises(ConfigError, match="memory_rlimit"):
        Limits(memory_rlimit="rss")
    with pytest.raises(ConfigError, match="timeout_s"):
        Limits(timeout_s=0)
    for bad in ("/etc/passwd", "../x.py", "a/../../b", ""):
        with pytest.raises(ConfigError, match="relative path"):
            Program({bad: "x"}, (Step(("true",)),))
    with pytest.raises(ConfigError, match="at least one step"):
        Program({}, ())
    with pytest.raises(ConfigError, match="isolation"):
        Sandbox(isolation="docker")


def test_result_and_error_text(mode):
    sb = box(mode)
    ok, bad = sb.run_many([py("print('hello')"), py("import sys\nprint('out')\nsys.exit('boom: broken')")])
    assert ok.ok and not ok.timed_out and ok.last.stdout == "hello\n" and ok.error_text() == ""
    assert not bad.ok and bad.last.returncode == 1 and bad.last.signal is None
    assert bad.error_text().startswith("step 'run' exit code 1") and "boom: broken" in bad.error_text()
    seg = sb.run(py("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"))
    assert (seg.last.returncode, seg.last.signal, seg.timed_out) == (-11, 11, False)
    assert "SIGSEGV" in seg.error_text()


def test_steps_stop_at_first_failure_and_missing_command(mode):
    r = box(mode).run(Program({}, (Step(("sh", "-c", "exit 4"), "compile"), Step(("echo", "never")))))
    assert len(r.steps) == 1 and r.last.name == "compile" and r.last.returncode == 4
    r = box(mode).run(Program({}, (Step(("no-such-command-xyz",)),)))
    assert r.last.returncode == 127 and "cannot execute" in r.last.stderr


def test_files_env_and_fresh_workdir(mode, monkeypatch):
    made = []
    real = iso.make_workdir
    monkeypatch.setattr(iso, "make_workdir", lambda files, owner: made.append(real(files, owner)) or made[-1])
    monkeypatch.setenv("QUANTLAB_SECRET", "hunter2-token")
    src = ("import os, json\nprint(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), "
           "'files': sorted(os.listdir('.')), 'data': open('pkg/d.bin', 'rb').read().hex()}))\n"
           "open('left.txt', 'w').write('x')\nimport helper\n")
    prog = get_toolchain("python").program(src, extra_files={"pkg/d.bin": b"\x00\xff", "helper.py": "X = 1\n"})
    prog = Program(prog.files, prog.steps, {"EXTRA": "1"})
    sb = box(mode)
    r1, r2 = sb.run(prog), sb.run(prog)
    assert r1.ok and r2.ok, r1.error_text() + r2.error_text()
    out = json.loads(r1.last.stdout)
    assert "hunter2-token" not in r1.last.stdout
    assert set(out["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "PWD", "EXTRA"}
    assert out["env"]["HOME"] == out["cwd"] == out["env"]["TMPDIR"] and out["env"]["EXTRA"] == "1"
    assert out["files"] == ["helper.py", "main.py", "pkg"] and out["data"] == "00ff"
    assert json.loads(r2.last.stdout)["files"] == out["files"]  # fresh dir: no left.txt
    assert len(made) == 2 and not any(p.exists() for p in made)


# --------------------------------------------------------------------------------------------- limits
def test_timeout_kills_the_whole_tree(mode):
    marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
    src = ("import os, subprocess\n"
           f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
           f"if os.fork() == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '{marker}'])\n"
           "while True:\n    pass\n")
    r = box(mode, Limits(timeout_s=1.0, cpu_s=5.0)).run(py(src))
    assert r.timed_out and not r.ok and r.last.signal == signal.SIGKILL and r.last.returncode == -9
    assert r.last.wall_s < 4.0  # measured 1.0-1.1 s
    assert "timed out" in r.error_text()
    assert _marked(marker) == []


def test_cpu_limit_is_a_timeout(mode):
    r = box(mode, Limits(timeout_s=20.0, cpu_s=1.0)).run(py("while True:\n    pass\n"))
    assert r.timed_out and r.last.signal == signal.SIGXCPU
    assert r.last.wall_s < 10.0  # measured 1.0-1.3 s


def test_memory_file_size_and_process_limits(mode):
    lim = Limits(timeout_s=10.0, cpu_s=10.0, memory_mb=512, file_size_mb=1, max_processes=16)
    mem, fsize, nproc = box(mode, lim).run_many([
        py("x = bytearray(1 << 30)"),
        py("open('big', 'wb').write(b'x' * (2 << 20))"),
        py("import os, time\nfor i in range(200):\n    if os.fork() == 0:\n"
           "        time.sleep(5)\n        os._exit(0)\n"),
    ])
    assert not mem.ok and "MemoryError" in mem.last.stderr
    assert not fsize.ok and "File too large" in fsize.last.stderr
    assert not nproc.ok and not nproc.timed_out and "Resource temporarily unavailable" in nproc.last.stderr


def test_fork_bomb_contained(mode):
    name = f"qlfb{os.getpid() % 10**6}"
    src = (f"import ctypes, os\nctypes.CDLL(None).prctl(15, b'{name}', 0, 0, 0)\n"
           "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    r = box(mode, Limits(timeout_s=2.0, cpu_s=2.0)).run(py(src))
    assert r.timed_out and not r.ok
    assert r.last.wall_s < 8.0  # measured 2.1-2.5 s
    assert _marked(name) == []


def test_output_is_capped(mode):
    host = psutil.Process()
    rss0 = host.memory_info().rss
    r = box(mode, Limits(timeout_s=2.0, cpu_s=2.0, max_output_bytes=1000)).run(
        py("import sys\nwhile True:\n    print('x' * 10**6)\n    print('e' * 10**5, file=sys.stderr)\n"))
    assert r.timed_out and r.last.truncated
    assert len(r.last.stdout) == 1000 and len(r.last.stderr) == 1000
    assert host.memory_info().rss - rss0 < 100 * 2**20  # measured < 5 MiB while ~GBs were printed


# --------------------------------------------------------------------------------------------- containment
def _protects(sb: Sandbox, key: str) -> bool:
    """Whether the sandbox's mode claims this protection (a mode's known limits skip, even in CI)."""
    d = sb.describe()
    return {"files": d["uid_drop"] or d["isolation"] == "bwrap", "signals": d["uid_drop"] or d["pid_namespace"],
            "network": d["network_isolated"]}[key]


def test_cannot_write_outside(mode, tmp_path):
    sb = box(mode)
    if not _protects(sb, "files"):
        pytest.skip("neither bubblewrap nor a uid drop (not root): files are not protected")
    tmp_path.chmod(0o755)
    sentinel = tmp_path / "results.jsonl"
    sentinel.write_text("keep\n")
    targets = (str(sentinel), str(tmp_path / "new.txt"), "/etc/ql-escape", "/ql-escape")
    src = (f"import os\nfor p in {targets!r}:\n    try:\n        open(p, 'w').write('pwned')\n"
           "        print('WROTE', p)\n    except OSError:\n        pass\n"
           f"try:\n    os.remove({str(sentinel)!r})\n    print('REMOVED')\nexcept OSError:\n    pass\n")
    r = sb.run(py(src))
    assert r.ok and "WROTE" not in r.last.stdout and "REMOVED" not in r.last.stdout
    assert sentinel.read_text() == "keep\n" and not (tmp_path / "new.txt").exists()


def test_cannot_kill_host(mode):
    sb = box(mode)
    if not _protects(sb, "signals"):
        pytest.skip("no uid drop and no pid namespace: the program could kill the host")
    canary = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        src = (f"import os\nfor pid in (os.getppid(), {os.getpid()}, {canary.pid}, -1):\n    try:\n"
               "        os.kill(pid, 9)\n        print('KILLED', pid)\n    except OSError:\n        pass\n")
        r = sb.run(py(src))
        # kill() may "succeed" without effect: kill(-1) whenever other processes exist, kill(1) = the
        # pid namespace's init, which ignores signals from inside; what matters is who is still alive
        assert r.ok and f"KILLED {os.getpid()}" not in r.last.stdout and f"KILLED {canary.pid}" not in r.last.stdout
        time.sleep(0.1)
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


def test_no_network(mode):
    sb = box(mode)
    if not _protects(sb, "network"):
        pytest.skip("no network namespace available in this mode")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.setblocking(False)
        port = srv.getsockname()[1]
        r = sb.run(py(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                      "    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e)\n"))
        assert r.ok and r.last.stdout.startswith("blocked")
        with pytest.raises(BlockingIOError):
            srv.accept()


# --------------------------------------------------------------------------------------------- sandbox object
def test_run_many_is_parallel_and_ordered(mode):
    """Results come back in input order, and programs really run at once: each reports when its sleep
    started and ended (CLOCK_MONOTONIC, shared by every process), and some intervals overlap. No
    wall-clock threshold: a loaded machine slows every program but cannot make them run one by one."""
    progs = [py(f"import time\na = time.monotonic()\ntime.sleep(0.5)\nprint({i}, a, time.monotonic())")
             for i in range(6)]
    res = box(mode, workers=3).run_many(progs, desc="sandbox test")
    rows = [r.last.stdout.split() for r in res]
    assert [int(row[0]) for row in rows] == list(range(6))
    spans = [(float(a), float(b)) for _, a, b in rows]
    overlapping = max(sum(a < end and start < b for a, b in spans) for start, end in spans)  # self included
    assert overlapping >= 2


def test_describe_is_stable_provenance(mode):
    a, b = box(mode), box(mode)
    d = a.describe()
    assert d == b.describe() and json.loads(json.dumps(d)) == d
    assert d["isolation"] == mode and d["limits"]["timeout_s"] == 3.0 and d["workers"] == 2
    assert d["uid_drop"] == iso.is_root() and d["judge"] == "completion-token v1"
    if mode == "bwrap":
        assert d["network_isolated"] and d["pid_namespace"] and d["bwrap_version"]


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    _python_for_none_mode(monkeypatch)
    fake = iso.BwrapInfo(None, None, False, "bwrap is not installed (apt-get install bubblewrap)")
    monkeypatch.setattr(iso, "detect_bwrap", lambda euid=None: fake)
    with caplog.at_level(logging.WARNING, logger="quantlab.execution"):
        sb = Sandbox(FAST, isolation="auto")
        res = sb.run_many([py("print(1)"), py("print(2)")])
    assert sb.isolation == "none" and all(r.ok for r in res)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "bwrap is not installed" in warnings[0].message and "NOT isolated" in warnings[0].message
    with pytest.raises(ConfigError, match="isolation"):
        Sandbox(isolation="bwrap")


def test_bwrap_available_when_required():
    if REQUIRE:
        assert iso.detect_bwrap(os.geteuid()).usable, iso.detect_bwrap(os.geteuid()).reason
        assert Sandbox(isolation="auto").isolation == "bwrap"
    else:
        assert Sandbox(FAST, isolation="auto").isolation in ("bwrap", "none")


# --------------------------------------------------------------------------------------------- self-check
def test_selfcheck_sample(mode):
    report = run_selfcheck(box(mode, Limits(timeout_s=1.5, cpu_s=1.5)), limit=20, early_exit=("python",))
    assert report.ok, report.table()
    names = {c.name for c in report.checks}
    assert {"fork_bomb", "kill_parent", "open_socket", "read_secrets", "write_outside"} <= names
    early = [c for c in report.checks if c.group == "early_exit"]
    assert len(early) == 20 and {"humaneval/python os._exit(0)", "babelcode/python atexit handler"} <= names
    if mode == "bwrap":
        assert report.fully_isolated, report.table()


def test_all_164_canonical_solutions_pass(monkeypatch):
    sb = Sandbox(Limits(timeout_s=10.0, cpu_s=10.0), isolation="auto", workers=2)
    if sb.isolation == "none":
        _python_for_none_mode(monkeypatch)
    problems = load_problems()
    res = sb.run_many([check_program(p, p["canonical_solution"]) for p in problems])
    assert len(problems) == 164
    assert [p["task_id"] for p, r in zip(problems, res) if not (r.ok and r.finished)] == []


@pytest.mark.slow
def test_selfcheck_cli_full(monkeypatch):
    from quantlab.execution.selfcheck import main

    _python_for_none_mode(monkeypatch)
    rc = main(["--workers", "2", "--timeout", "3"])
    assert rc == 0 if iso.detect_bwrap(os.geteuid()).usable else rc in (0, 2)
