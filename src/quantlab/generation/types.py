"""What goes into and comes out of a generation backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS: tuple[str, ...] = ("stop", "eos", "length")


@dataclass(frozen=True)
class GenRequest:
    """One prompt and the stop sequences that end its completions."""

    prompt: str
    stop: tuple[str, ...] = ()
    #: ``False`` when the prompt already carries its special tokens (a rendered chat template)
    add_special_tokens: bool = True
    #: token ids to start from instead of tokenizing ``prompt``, which then only labels the request
    #: (data-free QAT data starts from one id; the label keeps equal starts apart when seeding)
    prompt_ids: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        """Identity of the request for seeding: the prompt text, plus the token ids when given as ids."""
        return self.prompt if self.prompt_ids is None else f"{self.prompt}|ids:" + ",".join(map(str, self.prompt_ids))


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    Attributes:
        text: the continuation of the prompt, cut before the first stop sequence.
        n_tokens: tokens generated for it (up to and including the token that completed a stop
            sequence or EOS); the throughput numerator.
        finish_reason: ``stop`` (a stop sequence appeared), ``eos`` or ``length`` (budget used up).
        token_ids: the generated token ids (``n_tokens`` of them, before any stop-sequence cut);
            lets a caller cut a long completion to a shorter budget exactly (sampling sweeps).
    """

    text: str
    n_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def record(self) -> dict[str, Any]:
        """JSON-ready fields without the token ids (what the code-eval store keeps)."""
        return {"text": self.text, "n_tokens": self.n_tokens, "finish_reason": self.finish_reason}


@dataclass
class GenerationStats:
    """Throughput of one :func:`~quantlab.generation.generate` call."""

    backend: str = ""
    n_prompts: int = 0
    n_completions: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "n_prompts": self.n_prompts,
            "n_completions": self.n_completions,
            "generated_tokens": self.generated_tokens,
            "generation_wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "batches": self.batches,
            **self.extra,
        }
