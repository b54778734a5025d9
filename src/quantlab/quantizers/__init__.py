"""Quantization methods. Importing this package registers every built-in method."""
from quantlab.quantizers import awq, bnb, gptq, llm_qat, none, rtn, smoothquant, smoothquant_plus  # noqa: F401  (registration side effect)
from quantlab.quantizers.base import (
    QUANTIZERS,
    Quantizer,
    QuantizerConfig,
    build_quantizer,
    register_quantizer,
)

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerConfig", "build_quantizer", "register_quantizer"]
