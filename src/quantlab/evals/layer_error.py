"""Per-layer diagnostics: how far each quantized Linear is from its full-precision original.

For every quantized Linear (the keys of ``ctx.fp_weights``) two numbers are reported:

* **relative weight error** ``||W_fp - W_q||_F / ||W_fp||_F`` (data-free), and
* **output SQNR** on calibration data, in dB::

      SQNR = 10 * log10( sum ||Y_fp||^2 / sum ||Y_fp - Y_q||^2 )

  where, for the input ``X`` (tokens, in) the layer actually receives in the *quantized* model,
  ``Y_q`` (tokens, out) is the layer's own output and ``Y_fp = X W_fp^T + b`` is what the same
  layer would output with its original weight. Sums run over all calibration tokens and output
  channels (variable-length calibration sequences run in unpadded equal-length batches, so only
  real tokens count). Because ``X`` comes from the quantized model, errors of earlier layers are
  *not* removed: this is the error of each layer as deployed (errors propagate), not an isolated one.
  The full-precision signal ``Y_fp`` is the reference, as in the torchao SmoothQuant SQNR tests.

Contract on ``ctx.fp_weights``: it must hold, for each layer, the weight *that was rounded*
(after any function-preserving transform such as SmoothQuant / AWQ / SmoothQuant+ scaling, which
also rescales the layer's input ``X``). Pairing an untransformed ``W_fp`` with a transformed
input would measure the transform, not the quantization error. The layer's current bias is used
for ``Y_fp``: weight-only quantization leaves biases unchanged.

Precision: ``Y_fp`` is computed in float32 (float64 when the activations are float64). For a
half-precision model the noise therefore also contains the layer's own fp16/bf16 matmul rounding,
which is part of the deployed layer's error (floor measured on the tiny model with unquantized
weights: ~56 dB for bf16, ~74 dB for fp16; exactly inf for float32/float64).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.calib.sequential import Tokens, plan_chunks
from quantlab.errors import ConfigError, QuantlabError
from quantlab.evals.base import Evaluator, register_evaluator
from quantlab.nn.swap import dense_weight
from quantlab.types import EvalResult, RunContext
from quantlab.utils.checks import is_int
from quantlab.utils.torch_utils import model_device

log = logging.getLogger(__name__)

INPUTS_NOTE = "quantized model activations (errors propagate)"
SIGNAL_NOTE = "SQNR = 10*log10(sum ||Y_fp||^2 / sum ||Y_fp - Y_q||^2), Y_fp = F.linear(X, W_fp, b)"


def relative_weight_error(w_fp: torch.Tensor, w_q: torch.Tensor) -> float:
    """Relative Frobenius error ``||W_fp - W_q||_F / ||W_fp||_F``, computed in float64 on CPU.

    Args:
        w_fp: original weight, shape (out, in).
        w_q: quantized (dequantized) weight, same shape; any device/dtype.

    Returns:
        The ratio; ``0.0`` when both are all-zero, ``inf`` when only ``W_fp`` is all-zero.

    Raises:
        ValueError: if the shapes differ.
    """
    if w_fp.shape != w_q.shape:
        raise ValueError(f"weight shapes differ: fp {tuple(w_fp.shape)} vs quantized {tuple(w_q.shape)}")
    a = w_fp.detach().to("cpu", torch.float64)
    b = w_q.detach().to("cpu", torch.float64)
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(a).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-quantization-noise ratio ``10 * log10(signal / noise)`` in dB.

    Args:
        signal_energy: sum of squares of the reference signal (>= 0).
        noise_energy: sum of squares of the error (>= 0).

    Returns:
        The SQNR in dB. ``inf`` when ``noise_energy == 0`` (the output is reproduced exactly,
        including the degenerate all-zero signal); ``-inf`` when the signal is 0 but the noise is not.

    Raises:
        ValueError: for negative or NaN energies.
    """
    if not (signal_energy >= 0.0 and noise_energy >= 0.0):  # also rejects NaN
        raise ValueError(f"energies must be >= 0, got signal={signal_energy!r} noise={noise_energy!r}")
    if noise_energy == 0.0:
        return math.inf
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


@dataclass
class OutputErrorAccumulator:
    """Running sums of one layer's output energies over calibration batches.

    Attributes:
        signal: ``sum ||Y_fp||^2`` (full-precision output, the SQNR reference).
        output: ``sum ||Y_q||^2`` (the quantized layer's actual output).
        noise: ``sum ||Y_fp - Y_q||^2``.
        n_elements: number of output elements summed (tokens x out_features).
    """

    signal: float = 0.0
    output: float = 0.0
    noise: float = 0.0
    n_elements: int = 0

    def update(self, y_fp: torch.Tensor, y_q: torch.Tensor) -> None:
        """Add one batch.

        Args:
            y_fp: full-precision output, shape (..., out), float32 or float64.
            y_q: the layer's output, same shape; cast to ``y_fp``'s dtype before subtracting.
        """
        if y_fp.shape != y_q.shape:
            raise ValueError(f"output shapes differ: fp {tuple(y_fp.shape)} vs quantized {tuple(y_q.shape)}")
        y_q = y_q.to(y_fp.dtype)
        # squares in the compute dtype, sums accumulated in float64
        self.signal += torch.sum(y_fp.square(), dtype=torch.float64).item()
        self.output += torch.sum(y_q.square(), dtype=torch.float64).item()
        self.noise += torch.sum((y_fp - y_q).square(), dtype=torch.float64).item()
        self.n_elements += y_fp.numel()

    @property
    def sqnr_db(self) -> float:
        """``10 * log10(signal / noise)``; see :func:`sqnr_db`."""
        return sqnr_db(self.signal, self.noise)

    @property
    def mse(self) -> float:
        """Mean squared output error ``noise / n_elements`` (NaN before any update)."""
        return self.noise / self.n_elements if self.n_elements else math.nan


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _make_hook(w_fp: torch.Tensor, acc: OutputErrorAccumulator) -> Callable[..., None]:
    """Forward hook adding ``(Y_fp, Y_q)`` of one batch to ``acc``; ``W_fp`` is (out, in) on CPU."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0]  # (batch, seq, in): the quantized model's activation
        cdt = _compute_dtype(x)
        # moved per call, not cached: keeps only one extra weight on the device at a time
        w = w_fp.to(device=x.device, dtype=cdt)
        bias = getattr(module, "bias", None)
        b = None if bias is None else bias.detach().to(cdt)
        acc.update(F.linear(x.to(cdt), w, b), output.detach())

    return hook


@register_evaluator("layer_error")
@dataclass(frozen=True)
class LayerErrorEval(Evaluator):
    """Per-layer weight error and output SQNR of the quantized Linears.

    Attributes:
        max_samples: calibration rows (sequences) run through the model, the first ones; ``None`` = all.
        batch_size: rows per forward pass (variable-length data: at most this many sequences of one
            length per forward, never padded).
    """

    requires_calibration: ClassVar[bool] = True
    requires_fp_weights: ClassVar[bool] = True
    execution_fields: ClassVar[tuple[str, ...]] = ("batch_size",)

    max_samples: int | None = 8
    batch_size: int = 1

    def __post_init__(self) -> None:
        key = f"eval.{self.name or 'layer_error'}"
        m = self.max_samples
        if m is not None and (not is_int(m) or m < 1):
            raise ConfigError(f"{key}.max_samples", f"must be null (all rows) or an integer >= 1, got {m!r}")
        b = self.batch_size
        if not is_int(b) or b < 1:
            raise ConfigError(f"{key}.batch_size", f"must be an integer >= 1, got {b!r}")

    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        """Measure every layer in ``ctx.fp_weights`` on the first ``max_samples`` calibration rows.

        Args:
            model: the quantized model (not modified; forward hooks are removed before returning).
            tokenizer: unused (calibration data is already tokenized).
            ctx: needs ``fp_weights`` (fqn -> (out, in) original weight) and ``calib``
                (tokens (n, seqlen) int64, or variable-length sequences).

        Returns:
            Metrics ``layer/mean_rel_weight_error``, ``layer/mean_output_sqnr_db``,
            ``layer/min_output_sqnr_db`` (means are unweighted over layers; the SQNR mean is taken
            over the per-layer dB values) and table ``layer_diagnostics`` (one row per layer, in
            module order). No metrics when there are no quantized layers.
        """
        if not ctx.fp_weights:
            log.info("layer_error: no quantized layers, nothing to measure")
            return EvalResult(provenance={"layer": {"note": "no quantized layers"}})
        if ctx.calib is None:
            raise QuantlabError("layer_error needs calibration data")

        layers = self._layers_in_module_order(model, ctx.fp_weights)
        n_all = ctx.calib.n_samples
        n_rows = n_all if self.max_samples is None else min(self.max_samples, n_all)
        lengths = ctx.calib.lengths[:n_rows]
        accs = self._collect(model, layers, ctx.fp_weights, ctx.calib.head(n_rows))

        rows: list[dict[str, Any]] = []
        for name, mod in layers:
            w_fp = ctx.fp_weights[name]
            acc = accs[name]
            rows.append(
                {
                    "layer": name,
                    "out_features": int(w_fp.shape[0]),
                    "in_features": int(w_fp.shape[1]),
                    "rel_weight_error": relative_weight_error(w_fp, dense_weight(mod)),
                    "output_sqnr_db": acc.sqnr_db,
                    "output_mse": acc.mse,
                }
            )
        worst = min(rows, key=lambda r: r["output_sqnr_db"])  # first in module order on ties
        metrics = {
            "layer/mean_rel_weight_error": sum(r["rel_weight_error"] for r in rows) / len(rows),
            "layer/mean_output_sqnr_db": sum(r["output_sqnr_db"] for r in rows) / len(rows),
            "layer/min_output_sqnr_db": worst["output_sqnr_db"],
        }
        prov = {
            "calib": ctx.calib.name,
            "calib_sha256": ctx.calib.sha256,
            "n_rows": n_rows,
            "seqlen": max(lengths),
            "n_tokens": sum(lengths),
            "batch_size": self.batch_size,
            "n_layers": len(rows),
            "inputs": INPUTS_NOTE,
            "sqnr": SIGNAL_NOTE,
            "worst_layer": worst["layer"],
        }
        log.info(
            "layer_error: %d layers, mean SQNR %.2f dB, worst %s (%.2f dB)",
            len(rows), metrics["layer/mean_output_sqnr_db"], worst["layer"], worst["output_sqnr_db"],
        )
        return EvalResult(
            metrics=metrics,
            provenance={k: dict(prov) for k in metrics},
            tables={"layer_diagnostics": rows},
        )

    @staticmethod
    def _layers_in_module_order(
        model: nn.Module, fp_weights: dict[str, torch.Tensor]
    ) -> list[tuple[str, nn.Module]]:
        """``(fqn, module)`` for every key of ``fp_weights``, ordered as ``model.named_modules()``."""
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        missing = sorted(set(fp_weights) - set(order))
        if missing:
            raise ValueError(f"fp_weights names modules that are not in the model: {missing}")
        layers = [(name, model.get_submodule(name)) for name in sorted(fp_weights, key=order.__getitem__)]
        for name, mod in layers:
            dense = isinstance(getattr(mod, "weight", None), torch.Tensor) or hasattr(mod, "quantized_weight")
            w = dense_weight(mod) if dense else None  # packed layers (quantlab.nn.packed) dequantize
            want = tuple(fp_weights[name].shape)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != want:
                got = None if not isinstance(w, torch.Tensor) else tuple(w.shape)
                raise ValueError(f"layer {name!r}: weight shape {got} does not match fp weight {want}")
        return layers

    @torch.no_grad()
    def _collect(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        fp_weights: dict[str, torch.Tensor],
        tokens: Tokens,
    ) -> dict[str, OutputErrorAccumulator]:
        """Run ``tokens`` ((n, seqlen) or 1-D sequences) through ``model``, one hook per layer; the sums."""
        accs = {name: OutputErrorAccumulator() for name, _ in layers}
        device = model_device(model)
        handles = []
        try:
            for name, mod in layers:
                handles.append(mod.register_forward_hook(_make_hook(fp_weights[name], accs[name])))
            chunks = plan_chunks(tokens, self.batch_size)  # fixed rows: tokens.split(batch_size)
            t0 = time.perf_counter()
            for i, chunk in enumerate(chunks, 1):
                model(input_ids=chunk.tokens.to(device), use_cache=False)
                log.info("layer_error: chunk %d/%d (%d layers, %.0f s)", i, len(chunks), len(layers),
                         time.perf_counter() - t0)
        finally:
            for h in handles:
                h.remove()
        return accs
