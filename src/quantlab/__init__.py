"""quantlab: compare LLM quantization methods side by side in one harness.

Library code below :mod:`quantlab.pipeline` works on typed objects only; Hydra lives at the edge
(:mod:`quantlab.run`).
"""
__version__ = "0.1.0"
