"""Quantization methods. Importing this package registers every method: each module below it is
imported (:func:`quantlab.registry.import_submodules`), so ``quantizers/<name>.py`` with its
``@register_quantizer`` is all a new method needs here (README, "Adding a method")."""
from quantlab.quantizers.base import (
    QUANTIZERS,
    Quantizer,
    QuantizerConfig,
    build_quantizer,
    register_quantizer,
)
from quantlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["QUANTIZERS", "Quantizer", "QuantizerConfig", "build_quantizer", "register_quantizer"]
