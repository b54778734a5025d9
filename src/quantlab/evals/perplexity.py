"""Perplexity under two explicitly named protocols (never mix them in one table).

* ``gptq_nonoverlap`` (GPTQ ``llama.py`` / ``datautils.py``; copied by AWQ, SmoothQuant, OmniQuant,
  llmc): tokenize the joined text once, cut it into ``n_tokens // seqlen`` non-overlapping windows
  (tail dropped), score every window independently (its first token has no context, so
  ``seqlen - 1`` tokens are scored) and report ``exp(mean NLL)``.
* ``hf_strided`` (transformers docs, ``perplexity.md``): windows of ``seqlen`` tokens advancing by
  ``stride``; only the last ``trg_len = end - prev_end`` tokens of each window are scored, so each
  token is scored once with up to ``seqlen - stride`` tokens of extra context; lower than
  ``gptq_nonoverlap`` by construction.

Text assembly follows GPTQ: WikiText-2 ``"\\n\\n".join(texts)``, local files joined with ``"\\n\\n"``,
C4 = 256 random ``seqlen`` windows from validation documents longer than ``seqlen`` (``seed 0``).
Special tokens as the reference code adds them (``special_tokens=reference``, default): ``tokenizer(text)``
with the tokenizer's default special tokens, i.e. for Llama one BOS at the start of the joined stream
(GPTQ, HF) or of each C4 document (GPTQ); ``special_tokens=none`` adds none (quantlab before 2026-12).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.data.text import (
    HUB_SPLITS,
    encode_text,
    gptq_doc_windows,
    load_hub_texts,
    read_texts,
    relative_names,
    resolve_paths,
    text_sha256,
)
from quantlab.errors import ConfigError, DataError, QuantlabError
from quantlab.evals.base import Evaluator, register_evaluator
from quantlab.types import EvalResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

PROTOCOLS: tuple[str, ...] = ("gptq_nonoverlap", "hf_strided")
DATASETS: tuple[str, ...] = ("local", "wikitext2", "c4")
#: GPTQ's C4 evaluation set: 256 windows, ``random.seed(0)``.
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0
IGNORE_INDEX = -100

Window = tuple[int, int, int]  # (begin, end, trg_len)


def windows_gptq(n_tokens: int, seqlen: int, max_windows: int | None = None) -> list[Window]:
    """Non-overlapping windows of GPTQ's protocol.

    ``nsamples = n_tokens // seqlen`` windows ``[i*seqlen, (i+1)*seqlen)``; the tail is dropped
    (GPTQ ``llama_eval``). ``trg_len = seqlen``: the whole window is the target, of which the first
    token (no context) cannot be scored.

    Args:
        n_tokens: length of the token stream.
        seqlen: window length.
        max_windows: keep only the first ``max_windows`` windows (``None``: all).

    Returns:
        ``[(begin, end, trg_len), ...]``.
    """
    n = n_tokens // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return [(i * seqlen, (i + 1) * seqlen, seqlen) for i in range(n)]


def windows_strided(n_tokens: int, seqlen: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """Sliding windows of the transformers docs' strided protocol.

    ``for begin in range(0, n_tokens, stride): end = min(begin + seqlen, n_tokens);
    trg_len = end - prev_end``, stopping once ``end == n_tokens`` (transformers ``perplexity.md``).
    A window of a single token (nothing can be scored in it) is left out.

    Args:
        n_tokens: length of the token stream.
        seqlen: window length (``max_length`` in the docs).
        stride: step between window starts, ``1 <= stride <= seqlen``.
        max_windows: keep only the first ``max_windows`` windows (``None``: all).

    Returns:
        ``[(begin, end, trg_len), ...]``.
    """
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        if end - begin >= 2:
            out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out if max_windows is None else out[:max_windows]


def nll_of_window(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the non-ignored targets.

    Args:
        logits: shape (..., T, V), already aligned with ``targets`` (position ``t`` predicts
            ``targets[..., t]``, i.e. the caller applied the causal shift).
        targets: int64 token ids, shape (..., T); ``-100`` marks positions that are not scored.

    Returns:
        ``(sum_nll, count)``: float64 sum of ``-log_softmax(logits)[target]`` computed in float32
        (as ``logsumexp(logits) - logits[target]``), and the number of scored positions.
    """
    nll = _scored_nll(logits, targets)
    if nll.numel() == 0:
        return 0.0, 0
    return float(nll.double().sum()), int(nll.numel())


def _scored_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 NLL of every non-ignored target, in row-major order of ``targets``
    (see :func:`nll_of_window`)."""
    flat_t = targets.reshape(-1)
    mask = flat_t != IGNORE_INDEX
    if not bool(mask.any()):
        return logits.new_zeros(0, dtype=torch.float32)
    rows = logits.reshape(-1, logits.shape[-1])[mask].float()
    tgt = flat_t[mask].unsqueeze(-1)
    return torch.logsumexp(rows, dim=-1) - rows.gather(-1, tgt).squeeze(-1)


def _per_row_sums(nll: torch.Tensor, targets: torch.Tensor) -> list[list[float | int]]:
    """``[nll_sum, n_scored]`` of every row (window) of 2-D ``targets``, from :func:`_scored_nll`'s output.

    The scored positions of row ``r`` are a contiguous run of ``nll`` (row-major order), so the rows are
    split by their counts; each row's sum is float64 like the total's.
    """
    counts = (targets != IGNORE_INDEX).sum(dim=1).tolist()
    return [[float(part.double().sum()), int(n)] for part, n in zip(torch.split(nll, counts), counts)]


def _safe_exp(x: float) -> float:
    """``exp(x)``, ``inf`` instead of OverflowError (a badly broken model can have mean NLL > 709)."""
    return math.exp(x) if x < 709.0 else math.inf


def _forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of shape (B, T, V) for ``input_ids`` of shape (B, T)."""
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out = model(input_ids=input_ids, **kwargs)
    logits = getattr(out, "logits", out)
    return logits[0] if isinstance(logits, tuple) else logits


@register_evaluator("perplexity")
@dataclass(frozen=True)
class PerplexityEval(Evaluator):
    """Perplexity of the model on a text corpus.

    Attributes:
        dataset: ``local`` | ``wikitext2`` | ``c4``.
        path: ``local`` only: file, directory, glob or ``"stdlib"``; ignored for hub datasets.
        split: hub split (``wikitext2``: train/validation/test; ``c4``: train/validation).
        protocol: ``gptq_nonoverlap`` or ``hf_strided`` (see the module docstring).
        seqlen: window length in tokens.
        stride: window step, ``hf_strided`` only (``1 <= stride <= seqlen``).
        max_windows: evaluate only the first ``max_windows`` windows (bounds CPU time; recorded).
        batch_size: windows per forward pass (equal-length windows only are batched together).
        special_tokens: ``reference`` (default): the text is tokenized as the reference protocols do,
            ``tokenizer(text)`` with the tokenizer's default special tokens: GPTQ's wikitext2 / HF's strided
            evaluation get one BOS at the start of the joined stream for Llama tokenizers (so only the
            first window starts with it), GPTQ's C4 windows one per document; SmolLM2's and the tiny
            byte tokenizer add none, so their numbers are those of ``none``. ``none``: no special tokens
            (quantlab before 2026-12). Recorded in the provenance with ``bos_at_stream_start``.
    """

    dataset: str = "local"
    path: str | None = "stdlib"
    split: str = "test"
    protocol: str = "gptq_nonoverlap"
    seqlen: int = 2048
    stride: int = 512
    max_windows: int | None = None
    batch_size: int = 1
    special_tokens: str = "reference"

    execution_fields: ClassVar[tuple[str, ...]] = ("batch_size",)  # same windows, same sums

    def _key(self, field_name: str) -> str:
        return f"eval.{self.name or 'perplexity'}.{field_name}"

    def calibration_overlap(self, calib: dict[str, Any]) -> bool:
        """The calibration text is this evaluation's text: the same hub dataset and split, or the same local
        path (quantlab's offline defaults calibrate on ``stdlib_calib``, disjoint from ``stdlib``)."""
        if calib.get("name") != self.dataset:
            return False
        if self.dataset == "local":
            return calib.get("path") == self.path
        return calib.get("split") == self.split

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(
                self._key("dataset"), f"unknown dataset {self.dataset!r}; use one of {', '.join(DATASETS)}"
            )
        if self.special_tokens not in ("reference", "none"):
            raise ConfigError(self._key("special_tokens"), f"must be reference or none, got {self.special_tokens!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                self._key("protocol"),
                f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}",
            )
        if not is_int(self.seqlen) or self.seqlen < 2:
            raise ConfigError(self._key("seqlen"), f"must be an integer >= 2, got {self.seqlen!r}")
        strided = self.protocol == "hf_strided"
        if strided and (not is_int(self.stride) or not 1 <= self.stride <= self.seqlen):
            raise ConfigError(
                self._key("stride"), f"must be an integer in [1, seqlen={self.seqlen}], got {self.stride!r}"
            )
        if self.max_windows is not None and (not is_int(self.max_windows) or self.max_windows < 1):
            raise ConfigError(
                self._key("max_windows"), f"must be a positive integer or null, got {self.max_windows!r}"
            )
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(self._key("batch_size"), f"must be a positive integer, got {self.batch_size!r}")
        if self.dataset == "local" and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError(self._key("path"), "dataset=local needs a file, directory, glob or 'stdlib'")
        if self.dataset in HUB_SPLITS and self.split not in HUB_SPLITS[self.dataset]:
            raise ConfigError(
                self._key("split"),
                f"{self.dataset} has no split {self.split!r}; "
                f"use one of {', '.join(HUB_SPLITS[self.dataset])}",
            )
        if self.dataset == "c4" and self.protocol != "gptq_nonoverlap":
            raise ConfigError(
                self._key("protocol"), "c4 evaluation is GPTQ's set of random windows; use gptq_nonoverlap"
            )

    @property
    def metric(self) -> str:
        """Metric name, ``ppl/<name or dataset>``."""
        return f"ppl/{self.name or self.dataset}"

    def _tokens(self, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The token stream (1-D int64) and its provenance."""
        hint = (
            f"Offline? Use eval=[ppl_local] or set {self._key('dataset')}=local "
            f"{self._key('path')}=/some/*.txt (or stdlib)"
        )
        if self.dataset == "c4":
            texts = load_hub_texts("c4", self.split, hint=hint)
            n = C4_EVAL_WINDOWS if self.max_windows is None else min(C4_EVAL_WINDOWS, self.max_windows)
            stack, stats = gptq_doc_windows(texts, tokenizer, n, self.seqlen, C4_EVAL_SEED,
                                            special_tokens=self.special_tokens == "reference")
            prov = {"split": self.split, "c4_windows": n, "c4_seed": C4_EVAL_SEED, **stats}
            return stack.reshape(-1), {**prov, "text_sha256": text_sha256(texts)}
        if self.dataset == "local":
            assert self.path is not None
            paths = resolve_paths(self.path, self._key("path"))
            texts = read_texts(paths, self._key("path"))
            prov = {"split": None, "path": self.path, "files": relative_names(paths)}
        else:
            texts = load_hub_texts(self.dataset, self.split, hint=hint)
            prov = {"split": self.split}
        joined = "\n\n".join(texts)
        ids = torch.tensor(encode_text(tokenizer, joined, self.special_tokens == "reference"), dtype=torch.int64)
        return ids, {**prov, "text_sha256": text_sha256(texts)}

    def _windows(self, n_tokens: int) -> list[Window]:
        if self.protocol == "gptq_nonoverlap":
            return windows_gptq(n_tokens, self.seqlen, self.max_windows)
        return windows_strided(n_tokens, self.seqlen, self.stride, self.max_windows)

    def _score(
        self, model: nn.Module, tokens: torch.Tensor, windows: list[Window],
        per_window: list[list[float | int]] | None = None,
    ) -> tuple[float, int]:
        """Total NLL and scored-token count over ``windows`` of the 1-D ``tokens``.

        ``per_window``, when given, receives ``[nll_sum, n_scored]`` of every window in order (for paired
        comparisons); the totals are computed exactly as without it (same reduction, same float bits).
        """
        device = next(model.parameters()).device
        # batches of consecutive equal-length windows
        batches: list[list[Window]] = []
        for w in windows:
            last = batches[-1] if batches else None
            if last and len(last) < self.batch_size and last[0][1] - last[0][0] == w[1] - w[0]:
                last.append(w)
            else:
                batches.append([w])
        total_nll, total_count, done = 0.0, 0, 0
        report_every = max(1, len(windows) // 10)
        for batch in batches:
            ids = torch.stack([tokens[b:e] for b, e, _ in batch])  # (B, L)
            targets = ids[:, 1:].clone()  # (B, L-1): position t predicts token t+1
            for row, (b, e, trg_len) in enumerate(batch):
                n_scored = min(trg_len, e - b - 1)
                targets[row, : targets.shape[1] - n_scored] = IGNORE_INDEX
            logits = _forward_logits(model, ids.to(device))  # (B, L, V)
            targets = targets.to(logits.device)
            scored = _scored_nll(logits[:, :-1], targets)  # nll_of_window's computation, kept per position
            nll, count = float(scored.double().sum()), int(scored.numel())
            if per_window is not None:
                per_window.extend(_per_row_sums(scored, targets))
            if not math.isfinite(nll):
                b, e, _ = batch[0]
                raise QuantlabError(
                    f"{self.metric}: non-finite loss ({nll}) in window {done + 1} (tokens {b}:{e}); "
                    "the model produces NaN/Inf logits, check the quantized weights and scales"
                )
            total_nll += nll
            total_count += count
            prev, done = done, done + len(batch)
            if done // report_every != prev // report_every or done == len(windows):
                log.info(
                    "%s: window %d/%d, running ppl %.4f", self.metric, done, len(windows),
                    _safe_exp(total_nll / max(total_count, 1)),
                )
        return total_nll, total_count

    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        """Evaluate perplexity.

        Args:
            model: causal LM returning logits of shape (B, T, V) for ``input_ids`` (B, T).
            tokenizer: its tokenizer (``ctx.tokenizer`` when ``None``).
            ctx: run context (unused besides the tokenizer fallback).

        Returns:
            ``EvalResult`` with metric ``ppl/<name>``, its provenance and, in ``per_item``, every window's
            ``[nll_sum, n_tokens_scored]`` keyed by its index (``"0"``, ``"1"``, ...).

        Raises:
            DataError: the text cannot be loaded or is shorter than one window.
            QuantlabError: the loss is NaN/Inf.
        """
        tokenizer = tokenizer if tokenizer is not None else ctx.tokenizer
        tokens, data_prov = self._tokens(tokenizer)
        n_tokens = int(tokens.numel())
        if n_tokens < self.seqlen:
            raise DataError(
                f"{self.metric}: the text has only {n_tokens} tokens, fewer than one window of "
                f"seqlen={self.seqlen}. Fix: lower {self._key('seqlen')} or use more text"
            )
        windows = self._windows(n_tokens)
        log.info(
            "%s: %s, %d tokens, %d windows of %d",
            self.metric, self.protocol, n_tokens, len(windows), self.seqlen,
        )
        modes = [(m, m.training) for m in model.modules()]  # restored afterwards: never mutate the model
        model.eval()
        try:
            per_window: list[list[float | int]] = []
            with torch.no_grad():
                nll, count = self._score(model, tokens, windows, per_window)
        finally:
            for m, training in modes:
                m.training = training
        mean_nll = nll / count
        ppl = _safe_exp(mean_nll)
        prov: dict[str, Any] = {"ppl_protocol": self.protocol, "seqlen": self.seqlen}
        if self.protocol == "hf_strided":
            prov["stride"] = self.stride
        prov.update(
            dataset=self.dataset,
            **data_prov,
            n_tokens_total=n_tokens,
            n_tokens_scored=count,
            n_windows=len(windows),
            max_windows=self.max_windows,
            mean_nll=mean_nll,
            tokenizer=getattr(tokenizer, "name_or_path", ""),
            special_tokens=self.special_tokens,
            bos_at_stream_start=bool(n_tokens) and int(tokens[0]) == getattr(tokenizer, "bos_token_id", None),
        )
        log.info("%s = %.4f (%d tokens scored)", self.metric, ppl, count)
        per_item = {self.metric: {str(i): w for i, w in enumerate(per_window)}}
        return EvalResult(metrics={self.metric: ppl}, provenance={self.metric: prov}, per_item=per_item)
