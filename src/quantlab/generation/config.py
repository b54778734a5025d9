"""Decoding settings shared by every generation backend (recorded with every metric they produce)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from quantlab.errors import ConfigError
from quantlab.utils.checks import is_int

BACKENDS: tuple[str, ...] = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class DecodingConfig:
    """How completions are sampled.

    Attributes:
        do_sample: ``False`` = greedy (temperature/top_k/top_p are then ignored and recorded as such).
        temperature: softmax temperature for sampling (> 0).
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        n: completions per prompt (greedy allows only 1: every greedy sample would be identical).
        max_new_tokens: generation budget per completion.
        seed: seeds sampling; every sequence draws from its own generator seeded by
            ``(seed, prompt, sample index)``, so samples do not depend on batching.
        batch_size: sequences decoded together (continuous batching: a finished sequence's slot is
            refilled at once with the next one).
        backend: ``auto`` (vLLM when installed and the model is on a GPU, else HF), ``hf``, ``vllm``.
        tensor_parallel_size: vLLM's GPUs per model (tensor parallelism; ``auto``: every visible GPU). Above 1
            it needs the vLLM backend (an error on HF). Recorded: another reduction order can change a
            greedy completion.
        key: config key prefix used in error messages.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 16
    backend: str = "auto"
    tensor_parallel_size: int | str = 1
    key: str = "generation"

    def __post_init__(self) -> None:
        k = self.key
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"{k}.do_sample", f"must be true or false, got {self.do_sample!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ConfigError(f"{k}.temperature", f"must be > 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"{k}.top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"{k}.top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.n) or self.n < 1:
            raise ConfigError(f"{k}.n_samples", f"must be an integer >= 1, got {self.n!r}")
        if not self.do_sample and self.n != 1:
            raise ConfigError(
                f"{k}.n_samples", f"greedy decoding gives one completion per prompt; set do_sample=true for n={self.n}"
            )
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"{k}.max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"{k}.batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        if not is_int(self.seed):
            raise ConfigError(f"{k}.seed", f"must be an integer, got {self.seed!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{k}.backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        tp = self.tensor_parallel_size
        if tp != "auto" and (not is_int(tp) or tp < 1):
            raise ConfigError(f"{k}.tensor_parallel_size", f"must be an integer >= 1 or 'auto', got {tp!r}")
        if tp not in (1, "auto") and self.backend == "hf":
            raise ConfigError(f"{k}.tensor_parallel_size", f"{tp} GPUs per model needs backend vllm, not hf")

    def tp_size(self) -> int:
        """``tensor_parallel_size`` as a number (``auto``: the visible CUDA devices, at least 1)."""
        if self.tensor_parallel_size == "auto":
            import torch

            return max(1, torch.cuda.device_count())
        return int(self.tensor_parallel_size)

    def describe(self) -> dict[str, Any]:
        """Decoding settings as recorded (sampling knobs are ``None`` under greedy decoding)."""
        d = asdict(self)
        d.pop("key")
        d["decoding"] = "sample" if self.do_sample else "greedy"
        if not self.do_sample:
            d.update(temperature=None, top_k=None, top_p=None)
        return d
