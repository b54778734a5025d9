"""``calib.source=tokens``: calibration token ids read from a file, so any tool can be fed the same ids.

The file holds an integer tensor of input ids, shape ``(n, seqlen)``: a ``torch.save``'d tensor (``.pt`` /
``.pth``, read with ``weights_only=True``: no code runs) or a NumPy ``.npy`` array (read without pickle).
The first ``calib.n_samples`` rows are used (``-1``: all); ``calib.seqlen`` must be the file's row length
(the rows are used as they are: no re-windowing, no special tokens added). Every id must lie in the model's
vocabulary. The record carries the ids' hash (:func:`quantlab.types.tokens_sha256`, as for every source),
the file's own SHA-256 and its shape, so a peer tool's run on the same file can be matched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantlab.errors import ConfigError, DataError
from quantlab.types import CalibData, tokens_sha256
from quantlab.utils.hashing import file_sha256

SUFFIXES = (".pt", ".pth", ".npy")


def read_token_file(path: str | Path) -> torch.Tensor:
    """The int64 ``(n, seqlen)`` ids in ``path``; :class:`DataError` naming the file otherwise."""
    p = Path(path).expanduser()
    if p.suffix not in SUFFIXES:
        raise ConfigError("calib.path", f"{p}: a token file is a torch tensor ({', '.join(SUFFIXES[:2])}) or .npy")
    if not p.is_file():
        raise DataError(f"calib.path: token file {p} not found")
    try:
        if p.suffix == ".npy":
            ids = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            ids = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (numpy / torch raise many types for a corrupt or pickled file)
        raise DataError(f"calib.path: cannot read {p} as token ids ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ids, torch.Tensor):
        raise DataError(f"calib.path: {p} holds a {type(ids).__name__}, not a tensor of token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError(f"calib.path: {p} holds {ids.dtype} values; token ids are integers")
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"calib.path: {p} has shape {tuple(ids.shape)}; token ids are (n, seqlen)")
    return ids.to(torch.int64).contiguous()


def token_file_calib(path: str | None, n_samples: int, seqlen: int, vocab_size: int | None,
                     tokenizer: Any = None) -> CalibData:
    """:class:`CalibData` from a token file (see the module docstring)."""
    p = Path(path or "").expanduser()
    ids = read_token_file(p)
    n_file, width = ids.shape
    if width != seqlen:
        raise ConfigError("calib.seqlen", f"{p} has rows of {width} tokens; set calib.seqlen={width}")
    n = n_file if n_samples == -1 else n_samples
    if n > n_file:
        raise DataError(f"calib.n_samples: {p} has {n_file} rows, {n} asked")
    tokens = ids[:n].clone()
    vocab = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer is not None else None)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise DataError(f"calib.path: {p} has ids in [{lo}, {hi}], outside the model's vocabulary [0, {vocab})")
    prov = {"source": "tokens", "sampling": "file rows, as stored", "path": str(p), "file_sha256": file_sha256(p),
            "file_shape": [n_file, width], "rows_used": n, "special_tokens": "as in the file",
            "tokenizer": getattr(tokenizer, "name_or_path", "")}
    return CalibData(tokens, "tokens", n, seqlen, 0, tokens_sha256(tokens), prov)
