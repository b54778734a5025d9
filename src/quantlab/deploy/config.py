"""``deploy``: turn a run's fake-quantized model into a real low-bit one, and/or export it.

``deploy.pack=true`` replaces every quantized Linear by a :class:`~quantlab.nn.packed.PackedLinear`
(integer codes in memory, computed through ``deploy.backend``) before the evaluators run, so every
metric is the packed model's and ``memory/footprint_gb`` is measured from the real tensors.
``deploy.export=[compressed-tensors, gptq, awq]`` writes those checkpoints into ``<run dir>/export/<format>``
(:mod:`quantlab.deploy.export`; the same as ``python -m quantlab.export RUN_DIR OUT --format F`` later).

Only weight-only methods whose result is integer codes on an affine grid can be packed: RTN (int
formats), GPTQ (act_order included), AWQ and SmoothQuant+ (:attr:`Quantizer.packable`), 4 or 8 bits,
without W-A-KV activation/KV quantization (a W4A16 layer cannot hold it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantlab.errors import ConfigError
from quantlab.nn.packed import BACKENDS

EXPORT_FORMATS = ("compressed-tensors", "gptq", "awq")
PACK_BITS = (4, 8)


@dataclass(frozen=True)
class DeployConfig:
    """Attributes:
        pack: evaluate the packed model instead of the fake-quant one.
        backend: ``reference`` (the oracle: exact in fp32) | ``cpu`` (torch's int4 kernel, bf16 activations)
            | ``triton`` (the project's kernel; CUDA, or ``TRITON_INTERPRET=1``).
        export: checkpoint formats to write into ``<run dir>/export/<format>`` after quantizing.
    """

    pack: bool = False
    backend: str = "reference"
    export: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pack, bool):
            raise ConfigError("deploy.pack", f"must be true or false, got {self.pack!r}")
        if self.backend not in BACKENDS:
            raise ConfigError("deploy.backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        export = (self.export,) if isinstance(self.export, str) else tuple(self.export or ())
        bad = [f for f in export if f not in EXPORT_FORMATS]
        if bad:
            raise ConfigError("deploy.export", f"unknown format(s) {bad}; choose from {EXPORT_FORMATS}")
        object.__setattr__(self, "export", export)

    @property
    def needs_codes(self) -> bool:
        return self.pack or bool(self.export)

    def variant_settings(self, packed_model: bool = False) -> dict[str, Any] | None:
        """What changes the numbers: a packed model (packed here, or ``packed_model`` loaded from an export) and
        its backend; exports do not. None when the model is not packed (older variants stay unchanged)."""
        return {"pack": True, "backend": self.backend} if self.pack or packed_model else None

    def label(self) -> str:
        """Suffix of the method label of a packed run, e.g. `` [packed cpu]``."""
        return f" [packed {self.backend}]" if self.pack else ""


def check_exports_early(quantizer: Any, formats: tuple[str, ...]) -> None:
    """Before any work: refuse exports the method's settings already rule out (the same rules as
    :func:`quantlab.deploy.export.check_export`, which checks the codes themselves afterwards)."""
    from quantlab.deploy.export import check_scheme

    fmt, cfg = quantizer.format, quantizer.config
    act_order = bool(getattr(cfg, "act_order", False)) and not getattr(cfg, "static_groups", False)
    for name in formats:
        check_scheme(name, fmt.bits, fmt.group_size, fmt.symmetric, act_order)


def check_packable(quantizer: Any, key: str = "deploy.pack") -> None:
    """Raise :class:`ConfigError` (under ``key``) unless ``quantizer`` yields codes that can be packed."""
    fmt = quantizer.format
    if not getattr(quantizer, "packable", False):
        raise ConfigError(key, f"{quantizer.name} does not produce weight-only integer codes; packing and export "
                               "support rtn, gptq, awq and smoothquant_plus")
    if fmt is None or fmt.is_codebook:
        raise ConfigError(key, f"{fmt.kind if fmt else 'no'} format: nf4/fp4 codebooks are bitsandbytes' own "
                               "format (quantizer=bnb_*), not an affine integer grid")
    if fmt.bits not in PACK_BITS:
        raise ConfigError("quantizer.format.bits", f"packed layers hold {PACK_BITS}-bit codes, not {fmt.bits}-bit")
    if quantizer.config.wakv:
        raise ConfigError("quantizer.wakv", f"W-A-KV {quantizer.config.wakv} quantizes activations/KV cache, which a "
                                            "weight-only packed layer cannot represent")
