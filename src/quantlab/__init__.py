"""quantlab: compare LLM quantization methods side by side in one harness.

Hydra lives at the edge (:mod:`quantlab.cli`); the run itself (:mod:`quantlab.experiment`) and everything
below it work on typed objects only.
"""
__version__ = "0.1.0"
