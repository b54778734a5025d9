"""Text generation for task evaluations: batched HF ``generate`` (or vLLM on a GPU) with stop sequences."""
from quantlab.generation.config import DecodingConfig
from quantlab.generation.engine import choose_backend, generate
from quantlab.generation.stops import first_stop, truncate_at_stop
from quantlab.generation.types import Completion, GenerationStats, GenRequest

__all__ = [
    "Completion",
    "DecodingConfig",
    "GenRequest",
    "GenerationStats",
    "choose_backend",
    "first_stop",
    "generate",
    "truncate_at_stop",
]
