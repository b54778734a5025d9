"""On-demand virtual environments for the peer quantization tools.

Each peer (llm-compressor, GPTQModel, AutoAWQ) lives in its own venv so its
dependency pins never touch quantlab's.  A venv is keyed by a short hash of its
spec (pip list, extra constraints, torch version, base interpreter), created with
the caller's base interpreter, gets the caller's exact torch build first and then
the peer's packages under ``-c constraints.txt`` (torch pinned + the peer's extra
constraints), so pip can never swap torch for another (e.g. CUDA) build.

Markers inside the venv:
  .ready   written last, only on success: ``ensure_venv`` returns at once.
  .failed  the reason of the last failure: ``ensure_venv`` raises the same
           ``PeerUnavailable`` at once unless ``force=True``.

Stdlib only; runs under quantlab's interpreter (or any python >= 3.10).

CLI:  python scripts/peers/envs.py --root ~/.cache/quantlab/peers [--only KEY] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("quantlab.peers.envs")

DEFAULT_ROOT = Path.home() / ".cache" / "quantlab" / "peers"

# Packages every runner needs besides the peer itself (see _measure.py).
_COMMON = ["psutil>=5.9", "safetensors>=0.4", "numpy"]

PEER_ENVS: dict[str, dict] = {
    "llmcompressor": {
        "pip": ["llmcompressor==0.14.0.1", *_COMMON],
        "extra_constraints": [],
    },
    "gptqmodel": {
        # 7.6.0 is the last release for torch < 2.14.1
        "pip": ["gptqmodel==7.6.0", *_COMMON],
        "extra_constraints": [],
    },
    "autoawq": {
        # AutoAWQ is deprecated (archived upstream); its last tested stack is
        # transformers 4.51.x.
        "pip": ["autoawq==0.2.9", *_COMMON],
        "extra_constraints": ["transformers==4.51.3"],
    },
}

_TAIL_LINES = 40


class PeerUnavailable(RuntimeError):
    """A peer's venv could not be created/installed (reason holds pip's tail)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"peer {key!r} unavailable: {reason}")
        self.key = key
        self.reason = reason


def base_python() -> str:
    """The interpreter a new venv is created from (never a venv's own python)."""
    cand = getattr(sys, "_base_executable", None) or sys.executable
    if cand and Path(cand).exists():
        return cand
    fallback = "/root/.pyenv/versions/3.11.7/bin/python3"
    return fallback if Path(fallback).exists() else sys.executable


def torch_version() -> str:
    """The torch version installed in the caller's environment (e.g. '2.13.0+cpu')."""
    return importlib.metadata.version("torch")


def spec_of(key: str) -> dict:
    if key not in PEER_ENVS:
        raise KeyError(f"unknown peer env {key!r}; known: {sorted(PEER_ENVS)}")
    spec = PEER_ENVS[key]
    return {
        "key": key,
        "pip": list(spec["pip"]),
        "extra_constraints": list(spec.get("extra_constraints", [])),
        "torch": torch_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def venv_dir(key: str, root: Path) -> Path:
    blob = json.dumps(spec_of(key), sort_keys=True).encode()
    return Path(root).expanduser() / f"{key}-{hashlib.sha256(blob).hexdigest()[:10]}"


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _run(cmd: list[str], logfile: Path, env: dict | None = None) -> None:
    log.info("$ %s", " ".join(cmd))
    with open(logfile, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
        fh.write(proc.stdout)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, output=proc.stdout)


def ensure_venv(key: str, root: Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Create (once) and return the venv for peer ``key``.

    Raises ``PeerUnavailable`` when installation fails (or failed before and
    ``force`` is false).
    """
    spec = spec_of(key)
    venv = venv_dir(key, root)
    ready, failed = venv / ".ready", venv / ".failed"
    if ready.exists() and not force:
        return venv
    if failed.exists() and not force:
        raise PeerUnavailable(key, failed.read_text())
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    logfile = venv.parent / f"{venv.name}.install.log"
    logfile.write_text(json.dumps(spec, indent=1) + "\n")
    env = dict(os.environ)
    # the machine-wide pip constraint (if any) would replace ours on the CLI; ours pins torch anyway
    env.pop("PIP_CONSTRAINT", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    step = "venv"
    try:
        _run([base_python(), "-m", "venv", str(venv)], logfile, env)
        (venv / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        cons = venv / "constraints.txt"
        cons.write_text("\n".join([f"torch=={spec['torch']}", *spec["extra_constraints"]]) + "\n")
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--no-input"]
        step = "torch"
        _run(pip + [f"torch=={spec['torch']}", "-c", str(cons)], logfile, env)
        step = "peer"
        _run(pip + spec["pip"] + ["-c", str(cons)], logfile, env)
        step = "freeze"
        freeze = subprocess.run([str(venv_python(venv)), "-m", "pip", "freeze"],
                                check=True, capture_output=True, text=True).stdout
        (venv / "freeze.txt").write_text(freeze)
        installed_torch = next((ln.split("==", 1)[1] for ln in freeze.splitlines()
                                if ln.lower().startswith("torch==")), None)
        if installed_torch != spec["torch"]:
            raise subprocess.CalledProcessError(
                1, ["check-torch"], output=f"torch is {installed_torch}, expected {spec['torch']}")
    except subprocess.CalledProcessError as exc:
        reason = f"step {step!r} failed (exit {exc.returncode}):\n{_tail(exc.output or '')}"
        # keep only the marker (a half-built venv with torch is ~1 GB); the log stays beside it
        if venv.exists():
            shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir(parents=True, exist_ok=True)
        failed.write_text(reason)
        log.error("peer %s: %s (full log: %s)", key, reason, logfile)
        raise PeerUnavailable(key, reason) from exc
    if failed.exists():
        failed.unlink()
    ready.write_text(spec["torch"] + "\n")
    log.info("peer %s ready at %s", key, venv)
    return venv


def mark_failed(key: str, reason: str, root: Path = DEFAULT_ROOT) -> None:
    """Record that a peer installed but cannot run (so callers report it, not skip it)."""
    venv = venv_dir(key, root)
    venv.mkdir(parents=True, exist_ok=True)
    (venv / ".failed").write_text(reason)
    (venv / ".ready").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--only", action="append", choices=sorted(PEER_ENVS),
                    help="only this env (repeatable)")
    ap.add_argument("--force", action="store_true", help="rebuild even if ready/failed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    status = {}
    for key in args.only or list(PEER_ENVS):
        try:
            venv = ensure_venv(key, args.root, force=args.force)
            status[key] = {"ok": True, "venv": str(venv)}
            log.info("READY  %-14s %s", key, venv)
        except PeerUnavailable as exc:
            status[key] = {"ok": False, "reason": exc.reason}
            log.error("FAILED %-14s %s", key, exc.reason.splitlines()[0])
    json.dump(status, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if all(v["ok"] for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
