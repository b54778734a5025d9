"""Shared fixtures: offline environment, the tiny model, Hydra composition, CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Tests never touch the network: hub lookups fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Triton kernels (kernels/, quantlab.nn.packed's triton backend) run in triton's interpreter on CPU tensors;
# the flag must be set before anything imports triton in this process (GPU tests run it in a subprocess).
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small for intra-op threads; one thread avoids thrashing on busy CPUs.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    """(model, tokenizer) of the seeded in-code tiny Llama (float32)."""
    from quantlab.models.tiny import build_tiny_llama

    return build_tiny_llama()


def compose(overrides: list[str] | None = None):
    """Compose the primary config with ``overrides`` (Hydra compose API, no run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m quantlab ARGS`` in ``cwd`` with results under ``cwd/results``."""
    env = {**os.environ, "QUANTLAB_RESULTS": str(cwd / "results"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "quantlab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def random_calib(n: int = 8, t: int = 64, seed: int = 0):
    """A hand-built CalibData of ``n`` x ``t`` seeded random byte-token ids (the tiny model's vocabulary)."""
    from quantlab.types import CalibData, tokens_sha256

    tokens = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    return CalibData(tokens=tokens, name="random", n_samples=n, seqlen=t, seed=seed, sha256=tokens_sha256(tokens))


def as_sequences(calib):
    """The same rows as variable-length calibration data (a tuple of 1-D tensors)."""
    from quantlab.types import CalibData, tokens_sha256

    seqs = tuple(calib.tokens)
    return CalibData(seqs, calib.name, calib.n_samples, calib.seqlen, calib.seed, tokens_sha256(seqs))


def varlen_calib(lengths, seed: int = 5):
    """Variable-length calibration data: one seeded random byte-token sequence per length."""
    from quantlab.types import CalibData, tokens_sha256

    g = torch.Generator().manual_seed(seed)
    seqs = tuple(torch.randint(0, 256, (n,), generator=g) for n in lengths)
    return CalibData(seqs, "random", len(seqs), max(lengths), seed, tokens_sha256(seqs))


def cpu_ctx(tmp_path: Path, keep: bool = False):
    """A CPU RunContext writing below ``tmp_path`` (``keep``: ask for reference weights)."""
    from quantlab.types import RunContext

    return RunContext(device=torch.device("cpu"), seed=0, output_dir=Path(tmp_path), keep_reference_weights=keep)
