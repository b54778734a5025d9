"""Evaluator interface and registry.

An evaluator is a frozen config dataclass with ``kind`` (its registry key) and a ``run`` method:

    result = evaluator.run(model, tokenizer, ctx)   # -> EvalResult

Metric names are namespaced (``ppl/<name>``, ``layer/<stat>``). An evaluator never mutates the model
and never triggers quantization. Each ``conf/eval/<name>.yaml`` holds one top-level key (the
evaluator's name) so several can be selected at once: ``eval=[ppl_local,layer_error]``.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from quantlab.registry import Registry
from quantlab.types import EvalResult, RunContext

EVALUATORS: Registry[type[Evaluator]] = Registry("eval")


@dataclass(frozen=True)
class Evaluator(ABC):
    """Base of all evaluator configs.

    Attributes:
        name: label used in metric names (defaults to the YAML key, set by the pipeline).
    """

    name: str = ""

    kind: ClassVar[str] = ""
    #: the pipeline builds calibration data when an evaluator needs it (layer diagnostics)
    requires_calibration: ClassVar[bool] = False
    #: the pipeline keeps a copy of the original weights of quantized layers when True
    requires_fp_weights: ClassVar[bool] = False
    #: fields that change how the evaluator runs, never its numbers (left out of the run's variant,
    #: :mod:`quantlab.tracking.variant`)
    execution_fields: ClassVar[tuple[str, ...]] = ()
    #: fields that pick which slice of one study a job computes (a multirun axis whose jobs are parts of
    #: one grid, e.g. the sampling sweep's ``temperature``): in the variant, but the report gives the slices
    #: one label so the study's tables join them
    slice_fields: ClassVar[tuple[str, ...]] = ()
    #: settings added after runs were recorded, with the value that reproduces those runs: a field at that
    #: value is left out of the variant, so the earlier records keep their variant id
    neutral_settings: ClassVar[dict[str, Any]] = {}

    def variant_settings(self) -> dict[str, Any]:
        """The settings that can change this evaluator's numbers (part of the run's variant): every field
        but ``name``, :attr:`execution_fields` and :attr:`neutral_settings` at their neutral value."""
        drop = ("name", *self.execution_fields)
        return {"kind": self.kind, **{k: v for k, v in dataclasses.asdict(self).items() if k not in drop
                                      and not (k in self.neutral_settings and v == self.neutral_settings[k])}}

    def preflight(self) -> None:
        """Cheap checks run before the (possibly long) quantization: fail early on a missing data file
        or dataset. Default: nothing."""

    def check_model(self, model: nn.Module, tokenizer: Any) -> None:
        """Checks that need the loaded model or tokenizer (e.g. a chat template), run before quantizing.
        Default: nothing."""

    def calibration_overlap(self, calib: dict[str, Any]) -> bool:
        """Does the calibration set (``CalibData.describe()``) draw on this evaluator's own items? Such runs
        are flagged ``calibrated_on_eval_set`` in their record and in every table. Default: no."""
        return False

    @abstractmethod
    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        """Evaluate ``model`` and return metrics with provenance."""


def register_evaluator(kind: str):
    """Class decorator registering an evaluator config class under ``kind``."""

    def deco(cls: type[Evaluator]) -> type[Evaluator]:
        cls.kind = kind
        return EVALUATORS.register(kind)(cls)

    return deco
