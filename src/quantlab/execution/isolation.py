"""OS-level isolation for :mod:`quantlab.execution`: bubblewrap, the launcher, sandbox uids, cleanup.

How a step is started (``Sandbox`` builds the command line with :func:`step_argv`)::

    bwrap <namespaces + mounts> -- python -I -S -c <launcher> <spec> argv...      (isolation "bwrap")
    python -I -S -c <launcher> <spec with supervise + netns> argv...              (isolation "none")

The launcher (:mod:`quantlab.execution.launcher`) sets the rlimits, drops privileges and execs ``argv``;
the rlimits are therefore applied after bubblewrap has started (bubblewrap itself never runs under
them) and are inherited by everything the step starts (compilers included).

**Sandbox uids.** ``RLIMIT_NPROC`` is not enforced for root, and root may signal or write anything.
When the host runs as root, each running program gets its own unprivileged uid/gid
``61000 + slot`` (no supplementary groups, ``PR_SET_NO_NEW_PRIVS``), and its work dir is chowned to
it. A slot is held with an ``flock`` on ``/run/quantlab-sandbox/slot-<uid>.lock`` (a root-only
directory; the system temp dir when ``/run`` is not writable), so parallel workers, several
``Sandbox`` objects and several host processes never share a uid. Hence every worker has its own
``RLIMIT_NPROC`` budget, and "kill every process of this uid" is a safe sweep. Uids with an
``/etc/passwd`` entry are skipped. When the host is not root, the program keeps the host's uid;
``RLIMIT_NPROC`` then counts all the user's tasks, so the limit is set to the user's current task
count plus ``max_processes`` (approximate), and a program can signal the host's processes unless
bubblewrap's pid namespace hides them.

**bubblewrap** (``isolation="bwrap"``): read-only bind of ``/``; fresh ``/dev`` and ``/proc``; empty
tmpfs over ``/tmp``, ``/var/tmp``, ``/run``, ``/home``, ``/root`` and the host's ``$HOME`` (secrets
and other programs' work dirs disappear); the Python installation (and ``ro_paths``) re-bound
read-only where such a mask hid it; the work dir bound read-write at ``/tmp/work``; new network
(no interfaces but a down loopback), pid, ipc and uts namespaces; ``--die-with-parent``. At the
timeout the host SIGKILLs bubblewrap's pid-namespace init: the kernel kills the whole namespace and
bubblewrap reaps it (killing bubblewrap itself instead would leave its init as a zombie where pid 1
does not reap).

**Fallback** (``isolation="none"``): rlimits, own session/process group, the uid drop when root, a
new network namespace when the probe shows the kernel allows it (root: ``unshare(CLONE_NEWNET)``;
otherwise an unprivileged user+network namespace), and the launcher's subreaper supervision (kills
and reaps the whole tree, also processes that called ``setsid``). Not isolated: the file system
(the program reads what its uid may read and, as the sandbox uid, may create files in world-writable
dirs: ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are swept for files of that uid after each program),
and processes of the same uid when the host is not root.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from quantlab.execution.program import Limits

log = logging.getLogger(__name__)

UID_BASE = 61000
UID_SLOTS = 256
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INNER_WORKDIR = "/tmp/work"
MASKED_DIRS: tuple[str, ...] = ("/tmp", "/var/tmp", "/run", "/home", "/root")
WORLD_WRITABLE: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")
MIB = 1024 * 1024
TMPFS_BYTES = 64 * MIB
LAUNCHER_SOURCE = (Path(__file__).with_name("launcher.py")).read_text(encoding="utf-8")
_BWRAP_NS = ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox",
             "--die-with-parent")


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------- launcher
def rlimits(limits: Limits, root: bool) -> list[list]:
    """The ``[name, soft, hard]`` rlimits of ``limits`` (never above the host's own hard limits)."""
    cpu = max(1, math.ceil(limits.cpu_s))
    nproc = limits.max_processes if root else user_task_count() + limits.max_processes
    wanted = [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_CORE", 0, 0)]
    if limits.memory_mb:
        name = "RLIMIT_AS" if limits.memory_rlimit == "as" else "RLIMIT_DATA"
        wanted.append((name, limits.memory_mb * MIB, limits.memory_mb * MIB))
    if limits.file_size_mb:
        wanted.append(("RLIMIT_FSIZE", limits.file_size_mb * MIB, limits.file_size_mb * MIB))
    out = []
    for name, soft, hard in wanted:
        _, host_hard = resource.getrlimit(getattr(resource, name))
        if host_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, host_hard), min(hard, host_hard)
        out.append([name, soft, hard])
    return out


def user_task_count(uid: int | None = None) -> int:
    """Tasks (processes + threads) of ``uid`` (default: ours) right now."""
    uid = os.getuid() if uid is None else uid
    n = 0
    for p in psutil.process_iter(["uids", "num_threads"]):
        uids = p.info["uids"]
        if uids is not None and uids.real == uid:
            n += p.info["num_threads"] or 1
    return n


def launcher_argv(spec: dict, argv: Sequence[str]) -> list[str]:
    """``python -I -S -c <launcher> <spec> argv...``."""
    return [sys.executable, "-I", "-S", "-c", LAUNCHER_SOURCE, json.dumps(spec), *argv]


# --------------------------------------------------------------------------------------------- bubblewrap
@dataclass(frozen=True)
class BwrapInfo:
    """What :func:`detect_bwrap` found: ``usable`` after a real probe run, else ``reason``."""

    path: str | None
    version: str | None
    usable: bool
    reason: str
    tmpfs_size: bool = False


def runtime_paths(extra: Sequence[str] = ()) -> list[str]:
    """Host paths the sandbox must see although a masked directory may hide them: the Python
    installation running quantlab (its interpreter runs the launcher and Python programs) and ``extra``."""
    cands = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(os.path.realpath(sys.executable)).parent.parent), *extra]
    masks = [*MASKED_DIRS, *_home_mask()]
    out: list[str] = []
    for c in cands:
        for p in {os.path.abspath(c), os.path.realpath(c)}:
            if os.path.exists(p) and p not in out and any(p == m or p.startswith(m + "/") for m in masks):
                out.append(p)
    return sorted(out)


def tool_prefix(argv0: str) -> list[str]:
    """``[<prefix>]`` for an absolute ``<prefix>/bin/<tool>`` (its install tree), else ``[]``."""
    if not os.path.isabs(argv0):
        return []
    real = Path(os.path.realpath(argv0))
    return [str(real.parent.parent)] if real.parent.name == "bin" and len(real.parents) > 2 else []


def _home_mask() -> list[str]:
    home = os.path.realpath(os.path.expanduser("~"))
    return [home] if home not in ("/", "") and os.path.isdir(home) else []


def bwrap_argv(info: BwrapInfo, workdir: Path, ro_paths: Sequence[str] = ()) -> list[str]:
    """The ``bwrap ... --`` prefix for a step running in ``workdir``."""
    assert info.path is not None
    argv = [info.path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    masks = sorted({m for m in (*MASKED_DIRS, *_home_mask()) if os.path.isdir(m)}, key=len)
    masks = [m for m in masks if not any(m.startswith(o + "/") for o in masks)]  # /home covers /home/me
    for m in masks:
        if info.tmpfs_size:
            argv += ["--size", str(TMPFS_BYTES)]
        argv += ["--tmpfs", m]
    made: set[str] = set()
    for p in runtime_paths(ro_paths):
        # bwrap would create the missing parents inside the tmpfs mask with mode 0700 (unreachable for the
        # sandbox uid): create them 0755 first
        for parent in reversed(Path(p).parents):
            d = str(parent)
            if d not in made and any(d.startswith(m + "/") for m in masks):
                argv += ["--perms", "0755", "--dir", d]
                made.add(d)
        argv += ["--ro-bind", p, p]
    argv += ["--bind", str(workdir), INNER_WORKDIR, "--chdir", INNER_WORKDIR, *_BWRAP_NS, "--"]
    return argv


@functools.cache
def detect_bwrap(euid: int | None = None) -> BwrapInfo:
    """Find bubblewrap and probe it with the exact options steps use (cached per process and euid)."""
    path = shutil.which("bwrap")
    if path is None:
        return BwrapInfo(None, None, False, "bwrap is not installed (apt-get install bubblewrap)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
        version = out.split()[-1] if out.split() else "unknown"
        helptext = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10,
                                  check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return BwrapInfo(path, None, False, f"bwrap --version failed: {e}")
    info = BwrapInfo(path, version, True, "", tmpfs_size="--size" in helptext)
    work = Path(tempfile.mkdtemp(prefix="quantlab-bwrap-probe-"))
    try:  # as a sandbox uid when root: also proves that uid reaches the interpreter through the masks
        with UidSlots().acquire() if is_root() else contextlib.nullcontext(None) as uid:
            if uid is not None:
                os.chown(work, uid, uid)
            spec: dict[str, Any] = {"rlimits": [], "uid": uid, "supervise": False}
            argv = bwrap_argv(info, work) + launcher_argv(spec, [sys.executable, "-I", "-S", "-c", "pass"])
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={"PATH": SAFE_PATH},
                               check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return BwrapInfo(path, version, False, f"bwrap probe failed: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return BwrapInfo(path, version, False, f"bwrap {version} is installed but cannot create the sandbox: {why}")
    return info


@functools.cache
def probe_netns(euid: int | None = None) -> str | None:
    """The launcher's ``netns`` kind that works here without bubblewrap (``"root"``/``"user"``), or None."""
    kind = "root" if is_root() else "user"
    spec: dict[str, Any] = {"rlimits": [], "uid": None, "supervise": True, "netns": kind}
    try:
        r = subprocess.run(launcher_argv(spec, ["true"]), capture_output=True, timeout=30, check=False,
                           env={"PATH": SAFE_PATH}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return kind if r.returncode == 0 else None


def reachable_by_others(path: str) -> bool:
    """Whether a user with no special rights can traverse to and execute ``path`` (mode bits only)."""
    p = Path(os.path.realpath(path))
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(q.stat().st_mode & stat.S_IXOTH for q in p.parents)
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- sandbox uids
class UidSlots:
    """Exclusive sandbox uids for concurrently running programs (see the module docstring)."""

    def __init__(self, base: int = UID_BASE, n: int = UID_SLOTS) -> None:
        self.base, self.n = base, n
        self.dir = self._lock_dir()

    @staticmethod
    def _lock_dir() -> Path:
        for parent in ("/run", tempfile.gettempdir()):
            d = Path(parent) / "quantlab-sandbox"
            try:
                d.mkdir(mode=0o700, exist_ok=True)
                st = d.lstat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                return d
            log.warning("sandbox: ignoring lock dir %s (not a private directory of ours)", d)
        raise OSError("no private directory for the sandbox uid locks in /run or the temp dir")

    @contextlib.contextmanager
    def acquire(self) -> Iterator[int]:
        """Hold a free uid (blocks while all are taken); kills leftovers of it before and after use."""
        while True:
            for uid in range(self.base, self.base + self.n):
                if _has_passwd_entry(uid):
                    continue
                fd = os.open(self.dir / f"slot-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    kill_uid(uid)
                    yield uid
                finally:
                    kill_uid(uid)
                    os.close(fd)
                return
            time.sleep(0.05)


@functools.cache
def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def uid_processes(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real, effective or saved uid is ``uid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        state = uids = None
        for line in status.split(b"\n"):
            if line.startswith(b"State:"):
                state = line.split()[1:2]
            elif line.startswith(b"Uid:"):
                uids = [int(x) for x in line.split()[1:4]]
                break
        if uids and uid in uids and state != [b"Z"]:
            out.append(int(d))
    return out


_KILL_AS = ("import os, sys; u = int(sys.argv[1]); os.setresgid(u, u, u); os.setresuid(u, u, u); "
            "os.kill(-1, 9)")


def kill_uid(uid: int, rounds: int = 20) -> int:
    """Kill every process of ``uid`` (root only) until none is left; returns how many were found.

    A helper process switches to ``uid`` and calls ``kill(-1, SIGKILL)``, which reaches every process of
    that uid in one atomic sweep (a fork bomb cannot outrun it); repeated while any is left.
    """
    hit = 0
    for _ in range(rounds):
        procs = uid_processes(uid)
        if not procs:
            return hit
        hit += len(procs)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([sys.executable, "-I", "-S", "-c", _KILL_AS, str(uid)], timeout=30,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        time.sleep(0.01)
    log.warning("sandbox: processes of uid %d survive %d kill rounds", uid, rounds)
    return hit


# --------------------------------------------------------------------------------------------- work dirs
def make_workdir(files: dict[str, str | bytes], owner: int | None) -> Path:
    """A fresh private temp dir holding ``files`` (chowned to ``owner`` uid/gid when given)."""
    work = Path(tempfile.mkdtemp(prefix="quantlab-sbx-"))
    try:
        for name, content in files.items():
            dest = work / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            dest.write_bytes(data)
        if owner is not None:
            for dirpath, dirnames, filenames in os.walk(work):
                os.chown(dirpath, owner, owner)
                for f in filenames:
                    os.chown(os.path.join(dirpath, f), owner, owner, follow_symlinks=False)
    except BaseException:
        remove_tree(work)
        raise
    return work


def remove_tree(path: Path) -> None:
    """Remove ``path`` even when the program made parts of it unreadable (never follows symlinks)."""

    def onerror(func, p, exc_info):
        with contextlib.suppress(OSError):
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    if path.exists():
        log.warning("sandbox: could not remove work dir %s", path)


def sweep_world_writable(uid: int) -> list[str]:
    """Remove top-level entries of ``/tmp``, ``/var/tmp``, ``/dev/shm`` owned by ``uid``; returns them."""
    removed = []
    for d in WORLD_WRITABLE:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            with contextlib.suppress(OSError):
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    remove_tree(Path(e.path))
                else:
                    os.unlink(e.path)
                removed.append(e.path)
    return removed


def decode_status(rc: int, bwrap: bool) -> tuple[int, int | None]:
    """``(returncode, signal)``: Popen's ``-N`` is signal N; bubblewrap reports a signal as ``128 + N``
    (ambiguous with a program that exits with such a code itself; read as a signal)."""
    if rc < 0:
        return rc, -rc
    if bwrap and 128 < rc < 128 + signal.NSIG:
        return -(rc - 128), rc - 128
    return rc, None
