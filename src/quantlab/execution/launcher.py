"""The in-sandbox launcher: apply rlimits, drop privileges, then exec the untrusted command.

This file is run as ``python -I -S -c <this source> <spec json> <argv...>`` (it must not import quantlab
and uses only the standard library), directly under bubblewrap or, without bubblewrap, as the step's
process-group leader. The spec is a JSON object:

``rlimits``
    ``[[name, soft, hard], ...]`` with ``name`` a ``resource.RLIMIT_*`` attribute.
``uid``
    the unprivileged uid/gid to switch to (``null``: keep the current one).
``netns``
    ``"root"``: enter a new, empty network namespace (needs CAP_SYS_ADMIN); ``"user"``: a new user +
    network namespace mapping the current uid to itself (unprivileged); ``null``: none.
``supervise``
    ``false``: exec the command directly (bubblewrap's pid-namespace init reaps and kills everything).
    ``true``: fork; the child execs the command and this process stays as a *subreaper* supervisor: it reaps
    every orphan of the tree while the command runs, and when the command exits (or on SIGTERM, sent by the
    host at the timeout) SIGKILLs whatever is left of the tree and reaps it, then exits with the command's
    status (re-raising its signal). The command runs in its own process group, so one ``killpg`` ends
    all of it that did not call ``setsid``/``setpgid`` (atomically, fork bombs included). Without the
    supervisor, killed orphans would be reparented to the host's pid 1, which in some containers never
    reaps them (zombies that count against ``RLIMIT_NPROC``).

Everything is imported up front: after the privilege drop the sandbox uid may be unable to read this
interpreter's standard library (e.g. a Python under ``/root``).

Failures before the exec print ``quantlab-sandbox: ...`` on stderr and exit with status 127.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401  (os.execvp imports it lazily, which may fail after the uid drop)

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _fail(msg):
    os.write(2, ("quantlab-sandbox: " + msg + "\n").encode("utf-8", "replace"))
    os._exit(127)


def _libc():
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _unshare_net(kind):
    ctypes, libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET if kind == "root" else CLONE_NEWNET | CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "unshare(network namespace): " + os.strerror(err))
    if kind == "user":
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def _setup(spec):
    if spec.get("netns"):
        _unshare_net(spec["netns"])
    for name, soft, hard in spec.get("rlimits", []):
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = spec.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _, libc = _libc()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.umask(0o022)


def _exec(spec, argv):
    try:
        _setup(spec)
    except (OSError, ValueError) as e:
        _fail(f"cannot set up the sandbox: {e}")
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        _fail(f"cannot execute {argv[0]!r}: {e.strerror}")


def _children(me):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == me:
            kids.append(int(d))
    return kids


def _kill_uid(uid):
    """SIGKILL every process of ``uid`` at once: a child switches to it and calls kill(-1) (atomic w.r.t.
    fork, so it also stops fork bombs). Only when we are root and the program runs as its own uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _kill_all(uid):
    """SIGKILL and reap every remaining child (orphans of the tree are ours: we are a subreaper)."""
    me = os.getpid()
    while True:
        if uid is not None and os.geteuid() == 0:
            _kill_uid(uid)
        for pid in _children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return


class _Stop(Exception):
    pass


def _on_term(signum, frame):
    raise _Stop()


def _supervise(spec, argv):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        _libc()[1].prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGTERM, _on_term)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)  # its own group: one atomic killpg ends the tree (a fork bomb too) but not us
        _exec(spec, argv)
    status = None
    try:
        while True:
            wpid, st = os.waitpid(-1, 0)
            if wpid == pid:
                status = st
                break
    except (_Stop, ChildProcessError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    _kill_all(spec.get("uid"))
    sig = signal.SIGKILL if status is None else (os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
    if sig is None:
        os._exit(os.waitstatus_to_exitcode(status))
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


def main():
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    if not argv:
        _fail("no command")
    if spec.get("supervise"):
        _supervise(spec, argv)
    else:
        _exec(spec, argv)


if __name__ == "__main__":
    main()
