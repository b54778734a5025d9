"""Quantizer interface and registry.

A method is a frozen config dataclass (inspectable, serializable, validated in ``__post_init__``)
plus a :class:`Quantizer` subclass registered under the method's name. The run builds the
quantizer from the config object's type (:func:`build_quantizer`); the quantizer never reads Hydra
config, globals or environment variables, and writes files only below ``ctx.output_dir``.

Adding a method touches three files: ``quantizers/<name>.py``, ``conf/quantizer/<name>.yaml`` (extending
``_base.yaml``) and ``tests/test_<name>.py`` (README, "Adding a method").
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.formats.wakv import WAKV
from quantlab.models.mappings import ArchMapping, get_mapping
from quantlab.nn.swap import iter_linears
from quantlab.registry import Registry
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def _as_tuple(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(key, f"must be a list of glob patterns, got {value!r}") from None
    if not all(isinstance(v, str) for v in items):
        raise ConfigError(key, f"must be a list of glob patterns, got {value!r}")
    return items


@dataclass(frozen=True)
class QuantizerConfig:
    """Fields shared by every method.

    Attributes:
        include: glob patterns on module names selecting Linears to quantize (default: all).
        exclude: glob patterns removed from the selection (default: ``lm_head``, kept in full
            precision as in GPTQ, AWQ and the SmoothQuant+ vLLM fork).
        wakv: LLM-QAT's ``W-A-KV`` bits (``4-8-4``; 16 = full precision), or None: activation and KV-cache
            fake quantization composed after the method (:mod:`quantlab.wakv_step`); W must equal
            ``format.bits``, which it never changes.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lm_head",)
    wakv: str | None = None

    #: fields that change how the method runs, never its result (left out of the run's variant,
    #: :mod:`quantlab.tracking.variant`)
    execution_fields: ClassVar[tuple[str, ...]] = ()
    #: the method's own conventions, used where the format leaves them open (``null`` in the format YAMLs),
    #: so a preset's format never silently changes another method's convention; a run that departs from
    #: them shows it in its format label (:meth:`QuantFormat.short_name`)
    default_zero_in_range: ClassVar[bool] = False        # AWQ / SmoothQuant+ / llm-awq min-max range
    default_symmetric_grid: ClassVar[str] = "restricted"  # LLM-QAT's Eq. 3 grid

    def __post_init__(self) -> None:
        # Hydra passes lists; store tuples so configs stay hashable and immutable.
        object.__setattr__(self, "include", _as_tuple(self.include, "quantizer.include"))
        object.__setattr__(self, "exclude", _as_tuple(self.exclude, "quantizer.exclude"))
        fmt = getattr(self, "format", None)
        if isinstance(fmt, dict):
            fmt = QuantFormat(**fmt)
        if isinstance(fmt, QuantFormat):
            object.__setattr__(self, "format", fmt.resolve(self.default_zero_in_range, self.default_symmetric_grid))
        if self.wakv is not None:
            setting = WAKV.parse(self.wakv)
            object.__setattr__(self, "wakv", str(setting))
            fmt = getattr(self, "format", None)
            if isinstance(fmt, QuantFormat) and setting.quantizes_weights and fmt.bits != setting.w_bits:
                what = f"the 4-bit {fmt.kind} codebook" if fmt.is_codebook else f"quantizer.format.bits={fmt.bits}"
                raise ConfigError("quantizer.wakv", f"W={setting.w_bits} bits, but {what}: W-A-KV never changes the "
                                  "weight format; set the format's bits to W (presets: bits: ${wakv_w:${quantizer.wakv},4})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d


@dataclass(frozen=True)
class CalibratedConfig(QuantizerConfig):
    """Fields shared by methods that run the calibration engine.

    Attributes:
        batch_size: calibration samples per forward chunk (None: as many as fit in 16384 tokens).
        load_artifacts: path of an ``artifacts.safetensors`` (or a run directory holding one) from a
            previous run of the same method: re-apply it without calibrating or searching.
    """

    batch_size: int | None = None
    load_artifacts: str | None = None

    execution_fields: ClassVar[tuple[str, ...]] = ("batch_size",)  # chunking of the same sums

    def __post_init__(self) -> None:
        super().__post_init__()
        bs = self.batch_size
        if bs is not None and (not is_int(bs) or bs < 1):
            raise ConfigError("quantizer.batch_size", f"must be null (automatic) or an integer >= 1, got {bs!r}")
        if self.load_artifacts is not None and not isinstance(self.load_artifacts, str):
            raise ConfigError("quantizer.load_artifacts", f"must be a path, got {self.load_artifacts!r}")


C = TypeVar("C", bound=QuantizerConfig)


class Quantizer(ABC, Generic[C]):
    """Base class of all methods.

    Class attributes:
        name: registry key (== module name == YAML stem or its prefix).
        config_cls: the config dataclass this quantizer is built from.
        requires_calibration: the pipeline builds :class:`CalibData` only if True.
        is_identity: True for the full-precision baseline (no format is applied or recorded).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[QuantizerConfig]]
    requires_calibration: ClassVar[bool] = False
    is_identity: ClassVar[bool] = False
    #: format kinds this method can quantize to (``QuantFormat.kind``)
    supported_kinds: ClassVar[tuple[str, ...]] = ("int",)
    #: True when the loader applies the method (``from_pretrained(quantization_config=...)``):
    #: the run (:mod:`quantlab.experiment`) calls :meth:`prepare` and passes :meth:`load_config` to the loader
    quantizes_at_load: ClassVar[bool] = False
    #: True when :meth:`quantize` applies ``config.wakv`` itself (LLM-QAT); otherwise the W-A-KV step
    #: (:mod:`quantlab.wakv_step`) adds the activation and KV fake quantization after the method
    applies_wakv: ClassVar[bool] = False
    #: True when, with ``ctx.keep_codes``, :meth:`quantize` returns every quantized Linear's integer codes
    #: (:attr:`QuantResult.codes`): the run can be packed and exported (:mod:`quantlab.deploy`)
    packable: ClassVar[bool] = False
    #: True when every weight change of :meth:`quantize` happens inside the calibration engine's
    #: ``on_device`` (one block or Linear at a time): the method runs on offloaded models (``model.offload``)
    offloadable: ClassVar[bool] = False

    def __init__(self, config: C) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config: C = config

    def label(self, model_dtype: str) -> str:
        """How tables and plots name this method: ``fp32`` (the baseline, by model dtype) or
        ``<name> <format>`` (``rtn w4g64a``, ``rtn nf4g64dq``)."""
        if self.is_identity:
            return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(model_dtype, f"fp ({model_dtype})")
        fmt = self.format
        text = f"{self.name} {self.format_label()}" if fmt is not None else self.name
        return f"{text} {self.config.wakv}" if self.config.wakv else text

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight of a quantized Linear with ``in_features`` inputs (the format's; a method
        that stores more per group, e.g. HQQ's float zero points, says so here)."""
        fmt = self.format
        if fmt is None:
            raise ValueError(f"{self.name} has no weight format")
        return fmt.bits_per_weight(in_features)

    def format_label(self) -> str | None:
        """The format's short name, with the zero convention or symmetric grid where it departs from this
        method's own (``w4g64a:awq-zero`` for GPTQ on AWQ's convention); None without a format."""
        fmt = self.format
        cfg = type(self.config)
        return None if fmt is None else fmt.short_name(cfg.default_zero_in_range, cfg.default_symmetric_grid)

    def prepare(self, device: torch.device, model_dtype: torch.dtype) -> None:
        """Load-time methods: fail before loading when the method cannot run on ``device``."""

    def load_config(self, model_dtype: torch.dtype) -> Any:
        """Load-time methods: the ``quantization_config`` passed to ``from_pretrained``."""
        return None

    def needs_calibration(self) -> bool:
        """True when this run must build calibration data (not when re-applying saved artifacts)."""
        return self.requires_calibration and not getattr(self.config, "load_artifacts", None)

    @property
    def format(self) -> QuantFormat | None:
        """The weight format this method quantizes to (None for the identity baseline)."""
        return None if self.is_identity else getattr(self.config, "format", None)

    def target_linears(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        """The Linears selected by ``include``/``exclude``."""
        return list(iter_linears(model, self.config.include, self.config.exclude))

    def validate(self, model: nn.Module) -> None:
        """Check the config against the model before any data is loaded; raise :class:`ConfigError`."""
        targets = self.target_linears(model)
        if not targets and not self.is_identity:
            raise ConfigError(
                "quantizer.include",
                f"no nn.Linear matches include={list(self.config.include)} exclude={list(self.config.exclude)}",
            )
        fmt = self.format
        if fmt is not None:
            if fmt.kind not in self.supported_kinds:
                raise ConfigError(
                    "quantizer.format.kind",
                    f"{self.name} quantizes to {list(self.supported_kinds)} grids, not {fmt.kind!r} "
                    "(nf4/fp4 codebooks: quantizer=nf4_ref / fp4_ref, i.e. rtn with a codebook format)",
                )
            for name, mod in targets:
                fmt.check_layer(name, mod.in_features)

    @abstractmethod
    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        """Quantize ``model`` (in place is allowed) and return it with artifacts and a summary."""


class BlockwiseQuantizer(Quantizer[C]):
    """A calibrated method that works decoder block by decoder block through the architecture mapping
    (GPTQ, AWQ, SmoothQuant, SmoothQuant+): its targets must be Linears the mapping lists inside the
    blocks (lm_head or an unmapped Linear cannot be quantized by it), checked before any data is loaded.
    """

    requires_calibration = True

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        self.block_targets(model)

    def block_targets(self, model: nn.Module, mapping: ArchMapping | None = None) -> list[str]:
        """The selected Linears, sorted; :class:`ConfigError` (``quantizer.exclude``) for one outside the blocks."""
        mapping = mapping if mapping is not None else get_mapping(model)
        targets = sorted(name for name, _ in self.target_linears(model))
        outside = sorted(set(targets) - mapping.block_linears(model))
        if outside:
            raise ConfigError("quantizer.exclude",
                              f"{self.name} quantizes decoder-block Linears only; exclude {outside[:5]}")
        return targets


def register_quantizer(name: str, config_cls: type[QuantizerConfig]):
    """Class decorator: register a :class:`Quantizer` under ``name`` built from ``config_cls``."""

    def deco(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        cls.config_cls = config_cls
        return QUANTIZERS.register(name)(cls)

    return deco


def quantizer_class(config: QuantizerConfig) -> type[Quantizer]:
    """The registered quantizer class whose ``config_cls`` is ``type(config)``."""
    for _name, cls in QUANTIZERS.items():
        if type(config) is cls.config_cls:
            return cls
    raise ConfigError("quantizer", f"no quantizer is registered for config type {type(config).__name__}")


def build_quantizer(config: QuantizerConfig) -> Quantizer:
    """Instantiate the registered quantizer for ``config``."""
    return quantizer_class(config)(config)

