"""LLM-QAT's W-A-KV (Liu et al. 2023, section 3; the PTQ rows of Tables 1-2) as a step composed after any
weight method: ``quantizer.wakv=W-A-KV``.

The method quantizes the weights to its own format, whose bits must be W: this step never changes a
format (``W`` differing from ``quantizer.format.bits`` is a :class:`ConfigError` when the config is
built, :class:`~quantlab.quantizers.base.QuantizerConfig`; presets that sweep W-A-KV tie the bits to W
explicitly with ``bits: ${wakv_w:${quantizer.wakv},4}``). After the method, every selected Linear's input
is fake-quantized per token to A bits and every k_proj / v_proj output (the KV cache) per token to KV
bits, with LLM-QAT's symmetric MinMax (Eq. 3): each becomes a :class:`~quantlab.nn.qat.QATLinear` that
shares the method's weights and leaves them as they are. ``quantizer=none`` takes ``16-A-KV``.

A method that trains with W-A-KV in its graph (LLM-QAT: ``applies_wakv = True``) applies it itself;
here it is only recorded. Every run's summary gets ``wakv``: the setting asked for, or what the method
does on its own (weights at the format's bits, activations at ``act_bits`` for SmoothQuant, no KV).
"""
from __future__ import annotations

import logging

from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.wakv import FULL, WAKV
from quantlab.nn.qat import kv_linear_names, swap_wakv
from quantlab.quantizers.base import Quantizer
from quantlab.types import CalibData, QuantResult, RunContext

log = logging.getLogger(__name__)


def setting_of(quantizer: Quantizer) -> WAKV:
    """The run's W-A-KV bits: ``config.wakv`` when set, else what the method does by itself."""
    if quantizer.config.wakv:
        return WAKV.parse(quantizer.config.wakv)
    fmt = quantizer.format
    act = getattr(quantizer.config, "act_bits", None)
    return WAKV(fmt.bits if fmt is not None else FULL, act if act is not None else FULL, FULL)


def check(quantizer: Quantizer, model: nn.Module) -> None:
    """Refuse, before any data is loaded, a W-A-KV setting this method and model cannot take."""
    if not quantizer.config.wakv:
        return
    setting = WAKV.parse(quantizer.config.wakv)
    if quantizer.quantizes_at_load:
        raise ConfigError("quantizer.wakv", f"{quantizer.name} layers are not nn.Linear: no W-A-KV fake quantization")
    if quantizer.is_identity and setting.quantizes_weights:
        raise ConfigError("quantizer.wakv", f"quantizer=none keeps weights in full precision: W must be 16, got {setting}")
    if not quantizer.is_identity and not setting.quantizes_weights and not quantizer.applies_wakv:
        raise ConfigError("quantizer.wakv", f"W=16 leaves weights unquantized: use quantizer=none with wakv={setting}")
    if setting.quantizes_kv:
        kv_linear_names(model)  # an architecture without a KV mapping fails here, before any work


def apply(quantizer: Quantizer, result: QuantResult, targets: list[str]) -> None:
    """After ``quantizer.quantize``: swap ``targets`` (and the KV Linears) for activation / KV fake
    quantization when ``config.wakv`` asks for it and the method did not; record ``wakv`` in the summary."""
    setting = setting_of(quantizer)
    if quantizer.config.wakv and not quantizer.applies_wakv:
        kv = kv_linear_names(result.model) if setting.quantizes_kv else set()
        swapped = swap_wakv(result.model, targets, kv, FULL, setting.a_bits, setting.kv_bits)
        result.summary["wakv_swapped"] = len(swapped)
        log.info("W-A-KV %s: activations at %d bits, KV cache at %d bits on %d Linears", setting,
                 setting.a_bits, setting.kv_bits, len(swapped))
    result.summary["wakv"] = str(setting)


def quantize(quantizer: Quantizer, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
    """The method, then this step: what a run does between loading and evaluating."""
    targets = [n for n, _ in quantizer.target_linears(model)]
    result = quantizer.quantize(model, calib, ctx)
    apply(quantizer, result, targets)
    return result
