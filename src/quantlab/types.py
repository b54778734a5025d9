"""Typed objects passed between the pipeline, quantizers and evaluators.

Below :mod:`quantlab.cli` nothing sees Hydra/OmegaConf: only these dataclasses.
"""
from __future__ import annotations

import hashlib
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def tokens_sha256(tokens: torch.Tensor | Sequence[torch.Tensor]) -> str:
    """Content hash of calibration tokens.

    A tensor (the fixed-length (n, seqlen) case): int64 little-endian bytes, shape included (unchanged
    since the first version, so old hashes stay valid). A sequence of 1-D tensors (variable-length
    data): the tag ``varlen``, every length (int64), then every sequence's bytes; changing, adding,
    removing or re-cutting any sequence changes the hash, and it never equals a tensor's hash.
    """
    if isinstance(tokens, torch.Tensor):
        t = tokens.detach().to("cpu", torch.int64).contiguous()
        h = hashlib.sha256(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
        return h.hexdigest()
    seqs = [s.detach().to("cpu", torch.int64).contiguous().reshape(-1) for s in tokens]
    h = hashlib.sha256(b"varlen")
    h.update(torch.tensor([s.numel() for s in seqs], dtype=torch.int64).numpy().tobytes())
    for s in seqs:
        h.update(s.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CalibData:
    """A fixed calibration set: equal-length rows, or variable-length sequences.

    Fixed-length data (``random_windows`` / ``chunks`` sampling) is one int64 (n, seqlen) tensor.
    Variable-length data (``documents`` sampling: each document its own sequence, e.g. SmoothQuant+'s
    164 HumanEval prompts) is a tuple of 1-D int64 tensors; no padding is ever added, the calibration
    engine batches equal-length sequences together (:func:`quantlab.calib.sequential.plan_chunks`).

    Attributes:
        tokens: int64 token ids: a (n_samples, seqlen) tensor, or a tuple of n_samples 1-D tensors
            (a list is accepted and stored as a tuple).
        name: source name (``humaneval``, ``local``, ``wikitext2``, ``c4``, ``pile``, ``random``).
        n_samples: rows / sequences in ``tokens``.
        seqlen: columns of the tensor; for variable-length data the longest sequence.
        seed: seed used to pick the windows / order.
        sha256: content hash of ``tokens`` (see :func:`tokens_sha256`).
        provenance: extra facts recorded with the run (files, text hash, sampling scheme, ...).
    """

    tokens: torch.Tensor | tuple[torch.Tensor, ...]
    name: str
    n_samples: int
    seqlen: int
    seed: int
    sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tokens, torch.Tensor):
            return
        seqs = tuple(self.tokens)
        object.__setattr__(self, "tokens", seqs)
        if not seqs:
            raise ValueError("CalibData: no sequences")
        bad = [i for i, t in enumerate(seqs) if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0
               or t.dtype != torch.int64]
        if bad:
            raise ValueError(f"CalibData: sequence(s) {bad[:5]} are not non-empty 1-D int64 tensors")
        if self.n_samples != len(seqs) or self.seqlen != max((t.numel() for t in seqs), default=0):
            raise ValueError(f"CalibData: n_samples={self.n_samples}, seqlen={self.seqlen} do not match "
                             f"{len(seqs)} sequences of at most {max((t.numel() for t in seqs), default=0)} tokens")

    @property
    def is_variable(self) -> bool:
        """True when ``tokens`` is a tuple of sequences (``documents`` sampling)."""
        return not isinstance(self.tokens, torch.Tensor)

    @property
    def lengths(self) -> list[int]:
        """Tokens of every sequence, in order."""
        if isinstance(self.tokens, torch.Tensor):
            return [int(self.tokens.shape[1])] * int(self.tokens.shape[0])
        return [int(t.numel()) for t in self.tokens]

    @property
    def n_tokens(self) -> int:
        """Real calibration tokens (no padding exists in either form)."""
        return sum(self.lengths)

    def head(self, n: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The first ``n`` rows / sequences, in the same form as ``tokens``."""
        return self.tokens[:n]

    def describe(self) -> dict[str, Any]:
        """Provenance dict recorded in ``result.json`` (everything but the tokens)."""
        out = {
            "name": self.name,
            "n_samples": self.n_samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "sha256": self.sha256,
            **self.provenance,
        }
        if self.is_variable:
            lens = sorted(self.lengths)
            out["n_tokens"] = sum(lens)
            out["lengths"] = {"min": lens[0], "median": float(statistics.median(lens)), "max": lens[-1]}
        return out


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
        keep_codes: set by the harness when the run packs or exports its model: weight-only methods on an
            integer grid then return every quantized Linear's codes in :attr:`QuantResult.codes`.
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
    keep_codes: bool = False


@dataclass
class QuantResult:
    """What a quantizer returns.

    Attributes:
        model: the (possibly in-place modified) model.
        quantized_layers: fully-qualified names of the Linears that were quantized.
        artifacts: tensors needed to re-apply the result to a fresh model (codes, scales, ...); a dict, or
            a :class:`~quantlab.quantizers.artifacts.SpilledTensors` holding them on disk.
        summary: scalar facts about the quantization (e.g. chosen alpha, damping used).
        tables: named row lists found while quantizing (e.g. SmoothQuant+'s alpha -> loss curve);
            saved in the run dir and logged like evaluator tables.
        images: named image files the method wrote below ``ctx.output_dir`` (plots).
        reference_weights: for methods that transform weights before rounding, the transformed
            full-precision weights (CPU, ``fqn -> (out, in)``), returned only when
            ``ctx.keep_reference_weights``; layer diagnostics compare against these.
        codes: with ``ctx.keep_codes``, ``fqn -> QuantizedWeight`` (:mod:`quantlab.formats.codes`) for every
            quantized Linear: what :mod:`quantlab.deploy` packs and exports.
    """

    model: torch.nn.Module
    quantized_layers: list[str] = field(default_factory=list)
    artifacts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    reference_weights: dict[str, torch.Tensor] | None = None
    codes: dict[str, Any] | None = None


@dataclass
class EvalResult:
    """What an evaluator returns.

    Attributes:
        metrics: ``name -> value``; names are namespaced, e.g. ``ppl/local_stdlib``.
        provenance: ``metric name -> facts`` (protocol, seqlen, stride, dataset, n_tokens, ...).
        tables: named row lists (e.g. per-layer diagnostics), saved as CSV/JSON in the run dir.
        images: named image files the evaluator wrote below ``ctx.output_dir`` (plots; logged to W&B).
        per_item: ``metric name -> {item id -> value}``, the per-item outcomes behind a metric, for
            paired comparisons between runs (:mod:`quantlab.metrics.paired`). A value is either a number
            whose mean over items is the metric (code: per-problem pass@1 estimate ``c/n``, keys are task
            ids such as ``HumanEval/0`` or ``java/12``) or ``[nll_sum, n_tokens]`` of one evaluation window
            (perplexity = ``exp(sum nll / sum n_tokens)``; keys are window indices ``"0"``, ``"1"``, ...).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    per_item: dict[str, dict[str, Any]] = field(default_factory=dict)
