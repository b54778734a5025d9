"""Shared measurement helpers for the peer benchmark (quantlab arm and every peer runner).

Importable from any of the peer venvs: depends only on torch, psutil, safetensors
(and numpy for ``.npy`` token files).  Both sides of the comparison use this
module, so wall time and RSS are measured by the same code.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import json
import logging
import resource
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import psutil
import torch

log = logging.getLogger("quantlab.peers.measure")

SAMPLE_INTERVAL_S = 0.02


def trim_memory() -> None:
    """gc.collect() + glibc malloc_trim(0) so RSS reflects live memory (errors ignored)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - non-glibc platforms
        pass


def current_rss() -> int:
    return psutil.Process().memory_info().rss


class RssSampler:
    """Peak-RSS sampler: a daemon thread reads this process's RSS every 20 ms.

    ``start`` is the RSS at ``__enter__`` (taken right after gc + malloc_trim),
    ``peak`` the maximum seen (including the start and exit samples),
    ``elapsed_s`` the perf_counter time between enter and exit, ``cpu_s`` the process's CPU time (user +
    system) and ``minor_faults`` its minor page faults in that span (every first touch of freshly mapped
    memory is one: what an allocator that maps and unmaps its tensors pays).
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self.end = 0
        self.samples = 0
        self.elapsed_s = 0.0
        self.cpu_s = 0.0
        self.minor_faults = 0
        self._ru0: resource.struct_rusage | None = None
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self._proc.memory_info().rss
            self.samples += 1
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> "RssSampler":
        trim_memory()
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.elapsed_s = time.perf_counter() - self._t0
        ru, ru0 = resource.getrusage(resource.RUSAGE_SELF), self._ru0
        if ru0 is not None:
            self.cpu_s = (ru.ru_utime - ru0.ru_utime) + (ru.ru_stime - ru0.ru_stime)
            self.minor_faults = ru.ru_minflt - ru0.ru_minflt
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end = self._proc.memory_info().rss
        self.peak = max(self.peak, self.end)


def _is_tied(sd: Mapping[str, torch.Tensor]) -> bool:
    lm, emb = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    if lm is None or emb is None:
        return False
    if lm.shape != emb.shape:
        return False
    try:
        if lm.data_ptr() == emb.data_ptr():
            return True
    except Exception:  # noqa: BLE001 - e.g. meta tensors
        pass
    return bool(torch.equal(lm.detach().float().cpu(), emb.detach().float().cpu()))


def save_dense(state_dict_like: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
               path: str | Path, tied: bool | None = None) -> dict[str, torch.Tensor]:
    """Write fp32, CPU, contiguous, cloned tensors (HF Llama key names) as safetensors.

    ``lm_head.weight`` is dropped when it is tied to ``model.embed_tokens.weight``
    (``tied=None``: decided by identity/equality of the two tensors).
    Returns the dict written.
    """
    items = state_dict_like.items() if hasattr(state_dict_like, "items") else state_dict_like
    sd = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    if tied is None:
        tied = _is_tied(sd)
    out: dict[str, torch.Tensor] = {}
    for key, val in sd.items():
        if key == "lm_head.weight" and tied:
            continue
        if not val.is_floating_point():
            raise TypeError(f"save_dense: {key} is {val.dtype}; dequantize before saving")
        out[key] = val.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})
    log.info("wrote %d dense tensors to %s", len(out), path)
    return out


def load_tokens(path: str | Path) -> torch.Tensor:
    """Calibration token ids as a LongTensor [n, seqlen] from a ``.npy`` or ``.pt`` file."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, allow_pickle=False)
        ids = torch.from_numpy(arr.astype("int64", copy=False))
    elif path.suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping):
            obj = obj["input_ids"]
        ids = torch.as_tensor(obj)
    else:
        raise ValueError(f"load_tokens: unsupported token file {path} (want .npy or .pt)")
    if ids.dim() != 2:
        raise ValueError(f"load_tokens: expected [n, seqlen], got shape {tuple(ids.shape)}")
    return ids.to(torch.long).contiguous()


def versions(*dists: str) -> dict[str, str | None]:
    """Installed distribution versions (None when absent)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", *dists):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), (str, int)):
        return obj.value  # enums
    return str(obj)


def emit(result: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/result.json`` (values made JSON-safe) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    path.write_text(json.dumps(_jsonable(result), indent=1, sort_keys=False) + "\n")
    log.info("wrote %s", path)
    return path


def materialize(model: torch.nn.Module) -> None:
    """Copy every parameter into private (anonymous) memory before the timed step, in every arm.

    transformers maps a safetensors checkpoint of the model's dtype, so its weights start as pages of
    the file; a method that writes a weight would then show the page's copy-on-write as its own
    allocation. After this, the step's RSS increase is the method's working set only.
    """
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen and p.device.type == "cpu":
            seen.add(id(p))
            p.data = p.data.clone()
