"""Evaluators. Importing this package registers every evaluator: each module below it is imported
(:func:`quantlab.registry.import_submodules`), so a new ``evals/<name>.py`` with its
``@register_evaluator`` needs no import list (README, "Adding an evaluator")."""
from quantlab.evals.base import EVALUATORS, Evaluator, register_evaluator
from quantlab.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["EVALUATORS", "Evaluator", "register_evaluator"]
