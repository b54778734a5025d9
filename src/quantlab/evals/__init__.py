"""Evaluators. Importing this package registers every built-in evaluator."""
from quantlab.evals import layer_error, lm_eval_tasks, perplexity  # noqa: F401  (registration side effect)
from quantlab.evals.base import EVALUATORS, Evaluator, register_evaluator
from quantlab.evals.code import humaneval, multilingual  # noqa: F401  (registration side effect)
from quantlab.evals.sampling import sweep  # noqa: F401  (registration side effect)

__all__ = ["EVALUATORS", "Evaluator", "register_evaluator"]
