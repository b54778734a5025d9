"""W-A-KV bit settings (LLM-QAT, Liu et al. 2023, section 3): weight, Linear-input activation and
KV-cache bits written ``W-A-KV``, e.g. ``4-8-4``. 16 means "not quantized" (the paper's fp16 column).
"""
from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import ConfigError

FULL = 16  # the paper's "16": the tensor stays in floating point
#: the settings of the paper's Tables 1-2 (any other W-A-KV within the bit ranges is accepted too)
PAPER_SETTINGS = ("4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16")


@dataclass(frozen=True)
class WAKV:
    """Bits of weights (2..8 or 16), Linear-input activations (2..16) and the KV cache (2..16)."""

    w_bits: int
    a_bits: int
    kv_bits: int

    def __post_init__(self) -> None:
        for name, bits, lo in (("w", self.w_bits, 2), ("a", self.a_bits, 2), ("kv", self.kv_bits, 2)):
            if isinstance(bits, bool) or not isinstance(bits, int) or not (lo <= bits <= FULL):
                raise ConfigError("quantizer.wakv", f"{name} bits must be an integer in [{lo}, {FULL}], got {bits!r}")
        if 8 < self.w_bits < FULL:
            raise ConfigError("quantizer.wakv", f"weight bits must be 2..8 or 16, got {self.w_bits}")

    @classmethod
    def parse(cls, text: str) -> WAKV:
        """``"4-8-4"`` -> ``WAKV(4, 8, 4)``."""
        parts = str(text).split("-")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError("quantizer.wakv", f"must look like W-A-KV, e.g. 4-8-4, got {text!r}")
        return cls(*(int(p) for p in parts))

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < FULL

    @property
    def quantizes_acts(self) -> bool:
        return self.a_bits < FULL

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits < FULL

    def __str__(self) -> str:
        return f"{self.w_bits}-{self.a_bits}-{self.kv_bits}"
