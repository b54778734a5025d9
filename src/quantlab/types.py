"""Typed objects passed between the pipeline, quantizers and evaluators.

Below :mod:`quantlab.pipeline` nothing sees Hydra/OmegaConf: only these dataclasses.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def tokens_sha256(tokens: torch.Tensor) -> str:
    """Content hash of a token tensor (int64 little-endian bytes, shape included)."""
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CalibData:
    """A fixed calibration set.

    Attributes:
        tokens: int64 token ids, shape (n_samples, seqlen).
        name: source name (``humaneval``, ``local``, ``wikitext2``, ``c4``, ``pile``, ``random``).
        n_samples: rows in ``tokens``.
        seqlen: columns in ``tokens``.
        seed: seed used to pick the windows.
        sha256: content hash of ``tokens`` (see :func:`tokens_sha256`).
        provenance: extra facts recorded with the run (files, text hash, sampling scheme, ...).
    """

    tokens: torch.Tensor
    name: str
    n_samples: int
    seqlen: int
    seed: int
    sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Provenance dict recorded in ``result.json`` (everything but the tensor)."""
        return {
            "name": self.name,
            "n_samples": self.n_samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "sha256": self.sha256,
            **self.provenance,
        }


@dataclass
class RunContext:
    """What a quantizer or evaluator may know about the run besides the model.

    Attributes:
        device: device the model's compute runs on.
        seed: the run's seed; quantizers/evals must derive all randomness from it.
        output_dir: run directory; all file output goes below it.
        tokenizer: the model's tokenizer.
        calib: calibration set, if one was built for this run.
        fp_weights: original weights of the quantized Linears (``fqn -> (out, in) tensor``),
            kept only when an evaluator needs them (layer diagnostics).
        keep_reference_weights: set by the harness when an evaluator needs the weights that were
            rounded; methods that transform weights before rounding (AWQ, SmoothQuant, SmoothQuant+)
            then return them in :attr:`QuantResult.reference_weights`.
        run_fingerprint: hash of what determines the quantized model (model, method, calibration,
            seed, quantlab source); evaluators that cache expensive work (generations) key it on
            this. ``None`` outside the harness: nothing is reused across runs then.
        method_label: the method as tables and plots name it (e.g. ``rtn w4g64a``, ``bnb.nf4-dq``).
    """

    device: torch.device
    seed: int
    output_dir: Path
    tokenizer: Any = None
    calib: CalibData | None = None
    fp_weights: dict[str, torch.Tensor] | None = None
    keep_reference_weights: bool = False
    run_fingerprint: str | None = None
    method_label: str | None = None


@dataclass
class QuantResult:
    """What a quantizer returns.

    Attributes:
        model: the (possibly in-place modified) model.
        quantized_layers: fully-qualified names of the Linears that were quantized.
        artifacts: tensors needed to re-apply the result to a fresh model (codes, scales, ...).
        summary: scalar facts about the quantization (e.g. chosen alpha, damping used).
        tables: named row lists found while quantizing (e.g. SmoothQuant+'s alpha -> loss curve);
            saved in the run dir and logged like evaluator tables.
        images: named image files the method wrote below ``ctx.output_dir`` (plots).
        reference_weights: for methods that transform weights before rounding, the transformed
            full-precision weights (CPU, ``fqn -> (out, in)``), returned only when
            ``ctx.keep_reference_weights``; layer diagnostics compare against these.
    """

    model: torch.nn.Module
    quantized_layers: list[str] = field(default_factory=list)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    reference_weights: dict[str, torch.Tensor] | None = None


@dataclass
class EvalResult:
    """What an evaluator returns.

    Attributes:
        metrics: ``name -> value``; names are namespaced, e.g. ``ppl/local_stdlib``.
        provenance: ``metric name -> facts`` (protocol, seqlen, stride, dataset, n_tokens, ...).
        tables: named row lists (e.g. per-layer diagnostics), saved as CSV/JSON in the run dir.
        images: named image files the evaluator wrote below ``ctx.output_dir`` (plots; logged to W&B).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
