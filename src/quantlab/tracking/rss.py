"""Resident memory of this process during one step, sampled by a thread.

``getrusage``'s ``ru_maxrss`` (:func:`quantlab.tracking.env.peak_memory`) is the peak of the whole
process since it started: loading included, never reset. :class:`RssSampler` gives the peak *during*
a step (the run wraps the quantization in one): it reads ``/proc/self/status`` every
``interval`` seconds (``VmRSS``, and ``RssAnon``/``RssFile``: anonymous memory vs. pages of mapped
files such as safetensors checkpoints, which the kernel can drop under pressure), or psutil's RSS
where ``/proc`` is missing. A spike shorter than the interval can be missed; the step's
``ru_maxrss`` is recorded beside it as an upper bound when it grew during the step.
"""
from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path
from typing import Any

_GIB = 1024**3
_STATUS = Path("/proc/self/status")
_FIELDS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}


def rss_now() -> dict[str, int]:
    """Current resident bytes: ``rss`` (total) and, on Linux, ``anon`` and ``file``."""
    try:
        out = {}
        for line in _STATUS.read_text().splitlines():
            key = _FIELDS.get(line.split(" ", 1)[0].split("\t", 1)[0])
            if key:
                out[key] = int(line.split()[1]) * 1024  # kB
        if "rss" in out:
            return out
    except OSError:
        pass
    import psutil

    return {"rss": psutil.Process().memory_info().rss}


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class RssSampler:
    """``with RssSampler() as s: step()``, then ``s.summary()`` (GiB).

    Attributes:
        interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._peak: dict[str, int] = {}
        self._start: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss = (0, 0)
        self.n_samples = 0

    def _sample(self) -> None:
        now = rss_now()
        if now["rss"] >= self._peak.get("rss", -1):
            self._peak = now
        self.n_samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._start = rss_now()
        self._peak = dict(self._start)
        self._maxrss = (_maxrss_bytes(), 0)
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._maxrss = (self._maxrss[0], _maxrss_bytes())

    def summary(self) -> dict[str, Any]:
        """``start_rss_gb``, ``peak_rss_gb`` (and anon/file parts at the peak), the process's ``ru_maxrss``
        when the step raised it (an upper bound: a spike between samples), samples and interval."""
        out: dict[str, Any] = {"start_rss_gb": self._start.get("rss", 0) / _GIB,
                               "peak_rss_gb": self._peak.get("rss", 0) / _GIB}
        for key in ("anon", "file"):
            if key in self._peak:
                out[f"peak_rss_{key}_gb"] = self._peak[key] / _GIB
        before, after = self._maxrss
        if after > before:
            out["maxrss_gb"] = after / _GIB
        out.update(n_samples=self.n_samples, interval_s=self.interval)
        return out

