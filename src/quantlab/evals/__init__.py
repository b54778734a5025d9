"""Evaluators. Importing this package registers every built-in evaluator."""
from quantlab.evals import layer_error, perplexity  # noqa: F401  (registration side effect)
from quantlab.evals.base import EVALUATORS, Evaluator, register_evaluator

__all__ = ["EVALUATORS", "Evaluator", "register_evaluator"]
