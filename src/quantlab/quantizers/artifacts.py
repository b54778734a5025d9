"""Saving and re-applying what a method found (codes, scales, clips, smoothing factors).

Artifacts are one ``safetensors`` file per run (``artifacts.safetensors`` in the run directory).
Its metadata names the method and holds the method's config as JSON, so re-applying the file with
another method, or to a model whose layers do not match, fails with a clear error instead of
producing a silently different model.

A method whose artifacts grow with the model (GPTQ keeps every weight's integer code: a quarter of an
fp32 model's bytes) collects them in :class:`SpilledTensors`, which writes them to part files as they
come, and :func:`save_artifacts` streams the file one tensor at a time: neither holds them all in memory
(``model.offload`` quantizes models larger than memory).
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from quantlab.errors import ConfigError

ARTIFACTS_FILE = "artifacts.safetensors"
KEY = "quantizer.load_artifacts"


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class SpilledTensors(MutableMapping):
    """A ``name -> tensor`` mapping that keeps at most ``flush_bytes`` in memory: beyond that, the held
    tensors go to a safetensors part file in a temporary folder (removed with the object) and are read
    back on access. Tensors are stored on the CPU."""

    def __init__(self, parent: str | Path | None = None, flush_bytes: int = 64 * 2**20) -> None:
        self.flush_bytes = flush_bytes
        self._dir = Path(tempfile.mkdtemp(prefix="artifact-parts-", dir=parent))
        weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._where: dict[str, Path] = {}  # spilled name -> part file

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.pop(key, None)
        self._buf[key] = value.detach().to("cpu").contiguous()
        self._bytes += value.nelement() * value.element_size()
        if self._bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the held tensors to a new part file."""
        if not self._buf:
            return
        from safetensors.torch import save_file

        part = self._dir / f"part-{len(set(self._where.values())):05d}.safetensors"
        save_file(self._buf, str(part))
        self._where.update(dict.fromkeys(self._buf, part))
        self._buf, self._bytes = {}, 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._buf:
            return self._buf[key]
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def meta(self, key: str) -> tuple[torch.dtype, list[int]]:
        """``(dtype, shape)`` of an entry, without reading a spilled one."""
        if key in self._buf:
            return self._buf[key].dtype, list(self._buf[key].shape)
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as f:
            sl = f.get_slice(key)
            name = sl.get_dtype()
            return next(d for d, n in _DTYPES.items() if n == name), list(sl.get_shape())

    def __delitem__(self, key: str) -> None:
        if key in self._buf:
            t = self._buf.pop(key)
            self._bytes -= t.nelement() * t.element_size()
        else:
            del self._where[key]  # the bytes stay in the part file until the folder goes

    def __iter__(self) -> Iterator[str]:
        yield from list(self._where)
        yield from list(self._buf)

    def __len__(self) -> int:
        return len(self._where) + len(self._buf)


def _meta(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, list[int]]:
    if isinstance(tensors, SpilledTensors):
        return tensors.meta(key)
    t = tensors[key]
    return t.dtype, list(t.shape)


def save_artifacts(path: Path, tensors: Mapping[str, torch.Tensor], method: str, config: dict[str, Any]) -> Path:
    """Write ``tensors`` with the method name and config in the file's metadata (atomic rename).

    The safetensors file is streamed (header, then one tensor at a time), so a :class:`SpilledTensors`
    is never loaded whole; the file reads back as ``safetensors.torch.save_file``'s would.
    """
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    meta = {"quantlab_method": method, "config": json.dumps(config, sort_keys=True, default=str)}
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for k in names:
        dtype, shape = _meta(tensors, k)
        if dtype not in _DTYPES:
            raise TypeError(f"artifact {k}: dtype {dtype} has no safetensors code")
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[k] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in names:
            t = tensors[k].detach().to("cpu").contiguous()
            if t.nelement():
                # an ndarray is a buffer; numpy's stubs declare its __buffer__ for Python >= 3.12 only
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    tmp.replace(path)
    return path


def load_artifacts(path: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artifact file written for ``method``.

    ``path`` may be the file or a run directory containing ``artifacts.safetensors``.

    Returns:
        ``(tensors, saved_config)``.

    Raises:
        ConfigError: (key ``quantizer.load_artifacts``) if the file is missing, unreadable, or was
            written by another method.
    """
    from safetensors import safe_open

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ARTIFACTS_FILE
    if not p.is_file():
        raise ConfigError(KEY, f"artifact file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise ConfigError(KEY, f"cannot read artifact file {p}: {exc}") from None
    saved = meta.get("quantlab_method")
    if saved != method:
        raise ConfigError(KEY, f"{p} holds artifacts of method {saved!r}, not {method!r}")
    return tensors, json.loads(meta.get("config", "{}"))


def require(tensors: dict[str, torch.Tensor], key: str, source: str | Path) -> torch.Tensor:
    """``tensors[key]`` or a :class:`ConfigError` saying the artifact file does not fit the model."""
    try:
        return tensors[key]
    except KeyError:
        raise ConfigError(KEY, f"{source} has no entry {key!r}: it was made for a different model or layer selection") from None
