"""bitsandbytes at load time: NF4 / FP4 (optionally double-quantized) and LLM.int8().

The model is loaded through transformers' ``BitsAndBytesConfig`` (``from_pretrained(...,
quantization_config=...)``), exactly as the PTQ sampling study (Roy 2023) and QLoRA users do, so the
Linears become ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` and the forward pass runs bitsandbytes'
kernels. The *format* says what the weights become (one source of truth, as for every method):

* ``kind: nf4 | fp4``, ``bits: 4``, ``group_size: 64``: 4-bit codebook, one absmax per 64 values of
  the flattened weight (transformers' config has no blocksize option: 64 is what it loads);
  ``double_quant: true`` quantizes those absmax values to 8 bits in blocks of 256 (``*-dq``).
* ``kind: int``, ``bits: 8``, ``group_size: -1``, ``symmetric: true``: LLM.int8() (int8 weights with
  one fp32 scale per output row; activation columns with any value >= ``int8_threshold`` go through
  a 16-bit matmul with the int8-dequantized weights).

The 4-bit matmuls run in ``compute_dtype``: Roy's study computes in bfloat16 (section 2.2, QLoRA's
choice too), and so do the ``bnb_nf4*`` / ``bnb_fp4*`` presets; ``null`` (the dataclass default)
computes in the model's dtype, and the label then names it (``bnb.nf4 compute:fp16``).

The same codebooks as fake quantization (bit-exact, no bitsandbytes needed) are
``quantizer=nf4_ref`` / ``fp4_ref``.

Device support is probed before the model is loaded (a small bnb layer runs one forward on the
target device): bitsandbytes 0.50 runs 4-bit and int8 on CPU and CUDA; where a mode cannot run, the
run stops with a :class:`ConfigError` naming ``quantizer`` and the bitsandbytes message.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.torch_utils import resolve_dtype

log = logging.getLogger(__name__)

_GLOB = set("*?[")
COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")
_SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class BnbConfig(QuantizerConfig):
    """bitsandbytes quantization applied by ``from_pretrained``.

    Attributes:
        format: what the weights become (see the module docstring): nf4/fp4 with group 64 and an
            fp32 absmax (``scale_bits: 32``), optionally ``double_quant``; or 8-bit symmetric
            per-channel for LLM.int8().
        compute_dtype: dtype of the 4-bit matmuls (``bnb_4bit_compute_dtype``; ignored by int8);
            ``null`` = the model's dtype. Roy's study computes nf4/fp4 in bfloat16 (section 2.2), as
            QLoRA does: the ``bnb_nf4*`` / ``bnb_fp4*`` presets set ``bfloat16``, and the label names
            any other compute dtype (``bnb.nf4 compute:fp16``).
        int8_threshold: LLM.int8() outlier threshold (``llm_int8_threshold``; 6.0 as in the paper).
        cpu_bf16_kernel: on a CPU with AVX512-BF16, let bitsandbytes (0.50) repack every 4-bit layer at
            its first forward for its fast CPU kernel. That repack rounds the block absmax to bf16 and
            *undoes double quantization* (the absmax is dequantized), so nf4 and nf4-dq then compute
            with nearly the same weights. Off by default: the layers keep their stored format and the
            forward dequantizes it as on CUDA (what the paper measured), slower on CPU.
        exclude: module names kept in full precision, passed to ``llm_int8_skip_modules`` (plain
            names or suffixes such as ``lm_head``: transformers matches names, not globs).
    """

    format: QuantFormat = QuantFormat(kind="nf4", bits=4, group_size=64, symmetric=True, scale_bits=32)
    compute_dtype: str | None = None
    int8_threshold: float = 6.0
    cpu_bf16_kernel: bool = False

    def __post_init__(self) -> None:
        if self.wakv is not None:
            raise ConfigError("quantizer.wakv", "bitsandbytes layers are not nn.Linear; W-A-KV fake quantization "
                                                "applies to fake-quantized methods (rtn, gptq, awq, smoothquant, ...)")
        super().__post_init__()
        fmt = self.format
        if list(self.include) != ["*"]:
            raise ConfigError("quantizer.include", "bitsandbytes converts every Linear not excluded; "
                              f"use exclude to keep some in full precision, got include={list(self.include)}")
        bad = [p for p in self.exclude if _GLOB & set(p)]
        if bad:
            raise ConfigError("quantizer.exclude", f"bitsandbytes takes module names or suffixes, not globs: {bad}")
        if fmt.is_codebook:
            if fmt.group_size != 64:
                raise ConfigError("quantizer.format.group_size", "bitsandbytes loads 4-bit weights in blocks "
                                  f"of 64 (BitsAndBytesConfig has no blocksize option), got {fmt.group_size}")
            if fmt.scale_bits != 32:
                raise ConfigError("quantizer.format.scale_bits", "bitsandbytes stores an fp32 absmax per block: 32")
        elif not (fmt.kind == "int" and fmt.bits == 8 and fmt.group_size == -1 and fmt.symmetric):
            raise ConfigError("quantizer.format", "bitsandbytes quantizes to nf4/fp4 (group 64) or LLM.int8 "
                              "(bits=8 group_size=-1 symmetric=true); got " + fmt.short_name())
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError("quantizer.compute_dtype", f"must be one of {list(COMPUTE_DTYPES)}, "
                              f"got {self.compute_dtype!r}")
        if not isinstance(self.cpu_bf16_kernel, bool):
            raise ConfigError("quantizer.cpu_bf16_kernel", f"must be true or false, got {self.cpu_bf16_kernel!r}")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ConfigError("quantizer.int8_threshold", f"must be >= 0, got {self.int8_threshold!r}")

    @property
    def mode(self) -> str:
        """``nf4``, ``fp4``, ``nf4-dq``, ``fp4-dq`` or ``int8`` (the paper's names)."""
        if not self.format.is_codebook:
            return "int8"
        return self.format.kind + ("-dq" if self.format.double_quant else "")


def bnb_version() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return str(bitsandbytes.__version__)


def probe(mode: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Run one small bitsandbytes layer of ``mode`` on ``device``; :class:`ConfigError` if it cannot."""
    version = bnb_version()
    if version is None:
        raise ConfigError("quantizer", f"bnb {mode} needs bitsandbytes: pip install 'quantlab[bnb]'")
    import bitsandbytes as bnb

    torch.manual_seed(0)  # probe weights only; the run's RNG is re-seeded right after
    w = torch.randn(64, 128)
    try:
        if mode == "int8":
            layer: nn.Module = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
            x = torch.randn(2, 128, dtype=torch.float16)
        else:
            kind = mode.split("-")[0]
            layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=compute_dtype, quant_type=kind)
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind,
                                             compress_statistics=mode.endswith("-dq"), blocksize=64)
            x = torch.randn(2, 128, dtype=compute_dtype)
        layer = layer.to(device)
        with torch.no_grad():
            y = layer(x.to(device))
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite output")
    except Exception as e:  # any failure means this mode cannot run here: say which and why
        raise ConfigError("quantizer", f"bitsandbytes {version} cannot run {mode} on {device}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


@register_quantizer("bnb", BnbConfig)
class BnbQuantizer(Quantizer[BnbConfig]):
    """bitsandbytes 4-bit / 8-bit, applied by transformers while loading the model."""

    supported_kinds = ("int", "nf4", "fp4")
    #: the run passes :meth:`load_config` to the model loader instead of quantizing after loading
    quantizes_at_load = True

    def label(self, model_dtype: str) -> str:
        """The paper's column names: ``bnb.nf4``, ``bnb.nf4-dq``, ``bnb.fp4``, ``bnb.fp4-dq``, ``bnb.int8``;
        a 4-bit mode that computes in another dtype than the paper's bfloat16 says which
        (``bnb.nf4 compute:fp16``), so tables do not pool it with the paper's setting."""
        mode = self.config.mode
        compute = self.config.compute_dtype or model_dtype
        if mode == "int8" or compute == "bfloat16":
            return f"bnb.{mode}"
        return f"bnb.{mode} compute:{_SHORT_DTYPES.get(compute, compute)}"

    def compute_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        cd = self.config.compute_dtype
        return model_dtype if cd is None else cast(torch.dtype, resolve_dtype(cd, key="quantizer.compute_dtype"))

    def prepare(self, device: torch.device, model_dtype: torch.dtype) -> None:
        """Fail before loading when this mode cannot run on ``device``."""
        probe(self.config.mode, device, self.compute_dtype(model_dtype))

    def load_config(self, model_dtype: torch.dtype) -> Any:
        """transformers' ``BitsAndBytesConfig`` for this mode."""
        from transformers import BitsAndBytesConfig

        cfg, fmt = self.config, self.config.format
        skip = list(cfg.exclude) or None
        if cfg.mode == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(cfg.int8_threshold),
                                      llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=fmt.kind, bnb_4bit_use_double_quant=fmt.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype(model_dtype), llm_int8_skip_modules=skip,
        )

    def validate(self, model: nn.Module) -> None:
        """Every Linear outside ``exclude`` must have been converted by bitsandbytes (and none inside)."""
        import bitsandbytes as bnb

        bnb_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        converted: list[str] = []
        missed: list[str] = []
        wrong: list[str] = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            excluded = any(name == p or name.endswith("." + p) for p in self.config.exclude)  # no globs here
            is_bnb = isinstance(mod, bnb_types)
            if is_bnb:
                (wrong if excluded else converted).append(name)
            elif not excluded:
                missed.append(name)
        if not converted:
            raise ConfigError("quantizer", "bitsandbytes converted no Linear (is the model loaded through it?)")
        if missed or wrong:
            raise ConfigError("quantizer.exclude", f"bitsandbytes left {missed[:5]} unconverted and converted "
                              f"{wrong[:5]} although excluded: the exclude names do not match this model")

    def target_linears(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        import bitsandbytes as bnb

        return [(n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]

    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        """Nothing left to quantize (the loader did): set the CPU kernel choice and report what
        bitsandbytes produced."""
        targets = self.target_linears(model)
        repack = False
        mod: Any  # bitsandbytes layers: support_avx512bf16_for_cpu is a plain attribute
        for _, mod in targets:
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = bool(mod.support_avx512bf16_for_cpu and self.config.cpu_bf16_kernel)
                repack = repack or (mod.support_avx512bf16_for_cpu and mod.weight.device.type == "cpu")
        layers = [name for name, _ in targets]
        first: Any = model.get_submodule(layers[0])  # a bitsandbytes layer
        summary: dict[str, Any] = {
            "bnb_mode": self.config.mode,
            "bitsandbytes": bnb_version(),
            "n_layers": len(layers),
            "layer_type": type(first).__name__,
            "applied": "at load time (transformers BitsAndBytesConfig)",
        }
        if self.config.mode == "int8":
            summary["int8_threshold"] = float(self.config.int8_threshold)
        else:
            summary["compute_dtype"] = str(getattr(first, "compute_dtype", None)).replace("torch.", "")
            summary["blocksize"] = int(first.weight.quant_state.blocksize)
            summary["cpu_bf16_repack"] = repack  # True: bf16 absmax, double quantization undone at runtime
        return QuantResult(model=model, quantized_layers=layers, summary=summary)
