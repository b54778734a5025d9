"""QuantFormat: *what* a weight is quantized to, separate from *how* (the algorithm).

A format fixes the integer grid (bits), how weights share quantization parameters (per group of
``group_size`` consecutive input channels of one output row, or per output channel), and whether
the grid is symmetric around zero or carries a zero point. Algorithms (RTN, GPTQ, AWQ, ...) take a
format and decide *which* values land on that grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from quantlab.errors import ConfigError
from quantlab.utils.checks import is_int

KINDS = ("int", "nf4", "fp4")
#: symmetric integer grids: LLM-QAT's restricted one, GPTQ's ``--sym`` full one (see QuantFormat)
SYMMETRIC_GRIDS = ("restricted", "full")
#: codebook kinds (bitsandbytes' 4-bit types): absmax-scaled blocks of ``group_size`` values, see formats/nf4.py
CODEBOOK_KINDS = ("nf4", "fp4")
_KEY = "quantizer.format"


@dataclass(frozen=True)
class QuantFormat:
    """Integer weight format.

    Attributes:
        bits: code width b, 2..8; codes are unsigned in [0, 2^b - 1].
        group_size: number of consecutive input channels sharing one scale (and zero point);
            ``-1`` means one set of parameters per output channel (the whole row).
        symmetric: symmetric grid (no zero point stored; z fixed at 2^(b-1)) or asymmetric
            (min/max range with a b-bit zero point).
        kind: grid kind; ``int`` (uniform affine grid) or a 4-bit codebook, ``nf4`` / ``fp4``
            (bitsandbytes' data types: each block of ``group_size`` consecutive input channels is
            scaled by its absmax and every value is the nearest of 16 codebook entries; bits must
            be 4, ``symmetric``/``zero_in_range`` do not apply; see :mod:`quantlab.formats.nf4`).
        double_quant: codebook kinds only: the fp32 block absmax values are themselves quantized to
            8 bits in blocks of 256 (QLoRA "double quantization", bitsandbytes ``*-dq``).
        zero_in_range: asymmetric only. ``False`` = AWQ / SmoothQuant+ convention (range is the group's
            [min, max]; an all-positive group clips its top values). ``True`` = GPTQ convention
            (range widened to include 0). ``None`` (the format YAMLs' value) = the method's own
            convention, resolved by the quantizer config (:attr:`QuantizerConfig.default_zero_in_range`).
        symmetric_grid: symmetric only. ``restricted`` = LLM-QAT's grid (Eq. 3: s = max|w| / (2^(b-1) - 1),
            levels +-(2^(b-1) - 1), z = 2^(b-1)); ``full`` = GPTQ's ``--sym`` (s = 2 max|w| / (2^b - 1),
            z = 2^(b-1), all 2^b codes). ``None`` = the method's own grid, resolved like ``zero_in_range``.
        scale_bits: storage width of one scale (fp16 = 16), used only for bits-per-weight accounting.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    kind: str = "int"
    zero_in_range: bool | None = False
    scale_bits: int = 16
    double_quant: bool = False
    symmetric_grid: str | None = "restricted"

    @property
    def is_codebook(self) -> bool:
        return self.kind in CODEBOOK_KINDS

    def __post_init__(self) -> None:
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ConfigError(f"{_KEY}.bits", f"must be an integer in [2, 8], got {self.bits!r}")
        gs = self.group_size
        if not is_int(gs) or (gs != -1 and gs < 1):
            raise ConfigError(f"{_KEY}.group_size", f"must be -1 (per output channel) or >= 1, got {gs!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"{_KEY}.kind", f"must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"{_KEY}.symmetric", f"must be true or false, got {self.symmetric!r}")
        if self.scale_bits not in (8, 16, 32):
            raise ConfigError(f"{_KEY}.scale_bits", f"must be 8, 16 or 32, got {self.scale_bits!r}")
        if self.zero_in_range is not None and not isinstance(self.zero_in_range, bool):
            raise ConfigError(f"{_KEY}.zero_in_range", f"must be true, false or null (the method's own), got "
                              f"{self.zero_in_range!r}")
        if self.symmetric_grid not in (*SYMMETRIC_GRIDS, None):
            raise ConfigError(f"{_KEY}.symmetric_grid", f"must be one of {SYMMETRIC_GRIDS} or null (the method's "
                              f"own), got {self.symmetric_grid!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"{_KEY}.double_quant", f"must be true or false, got {self.double_quant!r}")
        if self.is_codebook:
            if self.bits != 4:
                raise ConfigError(f"{_KEY}.bits", f"{self.kind} is a 4-bit codebook; got bits={self.bits}")
            if gs == -1:
                raise ConfigError(f"{_KEY}.group_size", f"{self.kind} needs a block size (bitsandbytes: 64), not -1")
        elif self.double_quant:
            raise ConfigError(f"{_KEY}.double_quant", "applies only to the nf4/fp4 codebook kinds")

    def resolve(self, zero_in_range: bool, symmetric_grid: str) -> QuantFormat:
        """This format with the method's conventions where it leaves them open (``None``)."""
        return dataclasses.replace(
            self, zero_in_range=zero_in_range if self.zero_in_range is None else self.zero_in_range,
            symmetric_grid=symmetric_grid if self.symmetric_grid is None else self.symmetric_grid)

    def convention(self, zero_in_range: bool | None = None, symmetric_grid: str | None = None) -> str:
        """``:gptq-zero`` / ``:awq-zero`` / ``:gptq-grid`` / ``:llmqat-grid`` when this format's zero
        convention (asymmetric) or grid (symmetric) differs from the given method defaults, else ``""``."""
        if self.is_codebook:
            return ""
        if self.symmetric:
            if symmetric_grid is not None and self.symmetric_grid not in (None, symmetric_grid):
                return ":gptq-grid" if self.symmetric_grid == "full" else ":llmqat-grid"
            return ""
        if zero_in_range is not None and self.zero_in_range is not None and self.zero_in_range != zero_in_range:
            return ":gptq-zero" if self.zero_in_range else ":awq-zero"
        return ""

    @property
    def maxq(self) -> int:
        """Largest code, 2^b - 1."""
        return 2**self.bits - 1

    def effective_group_size(self, in_features: int) -> int:
        """Group size for a layer with ``in_features`` inputs (-1 resolves to ``in_features``)."""
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Raise :class:`ConfigError` unless ``group_size`` divides ``in_features`` of layer ``name``."""
        g = self.effective_group_size(in_features)
        if in_features % g != 0:
            raise ConfigError(
                f"{_KEY}.group_size",
                f"{g} does not divide in_features={in_features} of layer {name!r} "
                f"(choose a divisor of {in_features}, or -1 for per-channel)",
            )

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage bits per weight including per-group scale (and zero point when asymmetric).

        ``bpw = b + (scale_bits + [b if asymmetric]) / g``. For per-channel formats ``g`` is
        ``in_features`` (required then).
        """
        if self.group_size == -1:
            if in_features is None:
                raise ValueError("per-channel bits_per_weight needs in_features")
            g = in_features
        else:
            g = self.group_size
        if self.is_codebook:  # absmax per block; with double quantization 8 bits + an fp32 per 256 blocks
            return self.bits + (8 / g + 32 / (256 * g) if self.double_quant else self.scale_bits / g)
        overhead = self.scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + overhead / g

    def short_name(self, zero_in_range: bool | None = None, symmetric_grid: str | None = None) -> str:
        """Compact label, e.g. ``w4g128a`` (a = asymmetric, s = symmetric) or ``w8pcs``; given a method's
        default conventions, followed by :meth:`convention` where this format departs from them
        (``w4g64a:awq-zero`` = GPTQ run with AWQ's zero convention)."""
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        if self.is_codebook:
            return f"{self.kind}{g}{'dq' if self.double_quant else ''}"
        return f"w{self.bits}{g}{'s' if self.symmetric else 'a'}{self.convention(zero_in_range, symmetric_grid)}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
