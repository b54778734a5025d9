"""Loading the project's kernels from the top-level ``kernels/`` folder (shipped in the wheel as
``quantlab/kernels``, like ``conf/``; read from the repository in an editable install)."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType


def kernels_dir() -> Path:
    """``quantlab/kernels`` inside an installed wheel, else the repository's ``kernels/``."""
    here = Path(__file__).resolve().parent.parent  # .../quantlab
    for cand in (here / "kernels", here.parent.parent / "kernels"):
        if (cand / "w4a16_triton.py").is_file():
            return cand
    raise FileNotFoundError("kernels/w4a16_triton.py not found next to the quantlab package or in the repository")


def triton_available() -> bool:
    """triton imports, and a CUDA device is present or ``TRITON_INTERPRET=1`` was set when the kernel file
    was loaded (CPU correctness runs; the kernel module's own :func:`available`)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return bool(triton_kernels().available())


@functools.lru_cache(maxsize=1)
def triton_kernels() -> ModuleType:
    """The W4A16 Triton kernel module (``kernels/w4a16_triton.py``)."""
    path = kernels_dir() / "w4a16_triton.py"
    spec = importlib.util.spec_from_file_location("quantlab_kernels_w4a16_triton", path)
    assert spec is not None and spec.loader is not None  # a .py path always gets a source loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
