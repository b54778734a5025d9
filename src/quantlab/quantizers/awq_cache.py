"""AWQ's per-block bookkeeping (:mod:`quantlab.quantizers.awq`): what the capture pass keeps, the search
batches, which sequences eq. 4's loss uses, the one-stream schedule's stages and the clip sources."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantlab.algorithms import awq as A
from quantlab.calib.sequential import BlockData
from quantlab.models.mappings import ArchMapping, ScaleGroup

NO_CLIP = ("q_proj", "k_proj", "query", "key", "Wqkv")  # llm-awq auto_clip_block: clipping breaks QK^T
SEARCH_BATCH_TOKENS = 1024  # tokens per search forward (memory bound; 2048 before: docs/performance.md)


def take_rows(value: Any, idx: torch.Tensor, batch: int) -> Any:
    """Rows ``idx`` of every tensor in a module's kwargs whose first dim is the batch (others broadcast)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx.to(value.device)) if batch > 1 and value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, idx, batch) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, idx, batch) for k, v in value.items()}
    return value


def search_sequences(n_samples: int, seqlen: float, search_tokens: int | None) -> torch.Tensor | None:
    """Indices of the sequences eq. 4's loss uses: None (all) or ~search_tokens/seqlen, evenly strided.

    ``seqlen`` is the tokens per sequence (the mean length for variable-length data).
    """
    if search_tokens is None:
        return None
    k = max(1, min(n_samples, round(search_tokens / seqlen)))
    return torch.arange(k) * n_samples // k


@dataclass
class BlockCache:
    """What the block's single collect pass keeps (:mod:`quantlab.quantizers.awq` docstring, step 1)."""

    stat_names: set[str]
    direct: set[str]
    gram: set[str]
    clip: set[str]  # names whose input is sampled for the clip search (one per distinct input)
    step: int
    keep: torch.Tensor | None
    kw_only: set[str] = field(default_factory=set)  # one-stream schedule's stage modules: only their kwargs kept
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, list[tuple[torch.Tensor, dict[str, Any]]]] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    gram_tokens: dict[str, int] = field(default_factory=dict)
    clip_x: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    kwargs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per chunk, of kw_only modules
    n_tokens: int = 0
    _tok0: list[int] = field(default_factory=list)
    _index: list[torch.Tensor] = field(default_factory=list)

    def offsets(self, data: BlockData) -> None:
        """First token of every chunk in the flattened calibration set, and each chunk's sequence positions."""
        tok = 0
        for h in data.hidden:
            self._tok0.append(tok)
            tok += h.shape[0] * h.shape[1]
        self._index = list(data.index)
        self.n_tokens = tok

    def __call__(self, name: str, x: torch.Tensor, kw: dict[str, Any], chunk: int) -> None:
        flat = x.reshape(-1, x.shape[-1])
        dt = A.compute_dtype(x)
        if name in self.stat_names:  # eq. 5's s_X: sum |x| over every token
            s = sum(c.abs().sum(dim=0, dtype=dt) for c in flat.split(SEARCH_BATCH_TOKENS))  # bounded temporaries
            self.abs_sum[name] = self.abs_sum[name] + s if name in self.abs_sum else s
        if name in self.clip:  # llm-awq: tokens 0::step of the whole (flattened) calibration set
            first = (-self._tok0[chunk]) % self.step
            self.clip_x.setdefault(name, []).append(flat[first::self.step].to(dt, copy=True))
        if name in self.kw_only:
            self.kwargs.setdefault(name, []).append(kw)
        if name in self.direct or name in self.gram:
            for xs, kws in self._search_batches(x, kw, chunk):
                if name in self.direct:
                    self.inputs.setdefault(name, []).append((xs, kws))
                else:
                    xf = xs.reshape(-1, xs.shape[-1]).to(dt)
                    h = xf.T @ xf
                    self.grams[name] = self.grams[name] + h if name in self.grams else h
                    self.gram_tokens[name] = self.gram_tokens.get(name, 0) + xf.shape[0]

    def stream_batches(self, hidden: list[torch.Tensor], name: str) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """The one-stream schedule's search batches: views of the stream ``hidden`` with ``name``'s kwargs."""
        return [bk for ci, x in enumerate(hidden) for bk in self._search_batches(x, self.kwargs[name][ci], ci)]

    def _search_batches(self, x: torch.Tensor, kw: dict[str, Any], chunk: int):
        """The chunk's search sequences in sub-batches of <= SEARCH_BATCH_TOKENS tokens (views when contiguous)."""
        b = x.shape[0]
        per = max(1, SEARCH_BATCH_TOKENS // max(x.shape[1], 1))
        if self.keep is None:
            for i in range(0, b, per):
                idx = torch.arange(i, min(b, i + per))
                yield x[i:i + per], (take_rows(kw, idx, b) if b > per else kw)
            return
        local = torch.isin(self._index[chunk], self.keep).nonzero().flatten()  # ascending rows of the chunk
        for i in range(0, local.numel(), per):
            idx = local[i:i + per]
            yield x.index_select(0, idx.to(x.device)), take_rows(kw, idx, b)


def stream_stages(mapping: ArchMapping, groups: list[ScaleGroup], keep: torch.Tensor | None) -> dict[str, str] | None:
    """``module -> norm`` of the residual stages when the one-stream schedule applies (:mod:`quantlab.quantizers.awq`), else None.

    It needs every calibration token in the search (``keep`` None), each stage's ``norm -> [...]`` group
    (inspecting the stage's module) among ``groups``, the stages searched in order, and no other group
    changing a stage's weights before that stage's fp outputs are computed.
    """
    if keep is not None or not mapping.residual:
        return None
    stage_of = {(norm, mod): i for i, (norm, mod) in enumerate(mapping.residual)}
    passed = 0
    for g in groups:
        i = stage_of.get((g.prev, g.inspect))
        if i is not None:
            if i != passed:
                return None
            passed += 1
            continue
        names = (g.prev, *g.linears, g.inspect)
        inside = [k for k, (_, mod) in enumerate(mapping.residual) if any(n.startswith(mod + ".") for n in names)]
        if any(k >= passed for k in inside):  # would change a stage whose fp outputs are still to come
            return None
    if passed != len(mapping.residual):
        return None
    return {mod: norm for norm, mod in mapping.residual}


def clip_sources(mapping: ArchMapping, rels: list[str], clip: bool) -> dict[str, str]:
    """``Linear -> module whose input is its input`` for the Linears the clip search covers (all but q/k).

    The Linears of a scaling group share one input (:class:`ScaleGroup`), observed at the group's first
    Linear, so e.g. v_proj's sample is q_proj's input and up_proj's is gate_proj's.
    """
    if not clip:
        return {}
    first = {lin: g.linears[0] for g in mapping.groups for lin in g.linears}
    return {r: first.get(r, r) for r in rels if not any(t in r.rsplit(".", 1)[-1] for t in NO_CLIP)}
