"""Prompt sets for sampling sweeps.

``roy2023``: the ten short prompts of Roy, "Understanding the Impact of Post-Training Quantization on
Large Language Models" (arXiv 2309.05210), Table 5, verbatim, with the continuation the paper expects
(its "General Expected Continuation" column; recorded, not scored).

A file works too: ``.txt`` (one prompt per non-empty line) or ``.jsonl`` (objects with a ``prompt``
field and optionally ``expected``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import ConfigError, DataError


@dataclass(frozen=True)
class SweepPrompt:
    """One prompt of a sweep (``id`` = its position in the set)."""

    id: int
    text: str
    expected: str = ""


ROY2023: tuple[tuple[str, str], ...] = (
    ("Life in London", "Travel/Cultural/Work-Related/London specific stuff"),
    ("It is easy to be a techie", "Comparison of techie with other probable roles in tech sector"),
    ("Stock brokers are earning", "Stock brokers and their earning style, sources, etc"),
    ("It looks like written by Shakespeare", "Shakespeare style text comparison"),
    ("Hello, my name is", "Chat or Introduction"),
    ("Global warming and AI", "Global Warming and AI in general as well as their +ive and -ive association"),
    ("Current world order", "Essay/Discussion/Power and Politics related tow world order"),
    ("Percentage of people adore actors and singers",
     "Stats on people following their favourite actors/singers and discussion on the related topic"),
    ("Exercise and eating habits for", "Eating habits and exercise routine in general (pros and cons)"),
    ("Millennial and genz", "Comparison and contrast between millennial and genz"),
)

BUILTIN = {"roy2023": ROY2023}


def load_prompts(source: str, key: str = "eval.sampling.prompts") -> list[SweepPrompt]:
    """The prompts named by ``source``: a built-in set (``roy2023``) or a ``.txt``/``.jsonl`` file."""
    if source in BUILTIN:
        return [SweepPrompt(i, p, e) for i, (p, e) in enumerate(BUILTIN[source])]
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{source!r} is neither a built-in prompt set {sorted(BUILTIN)} nor a file")
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[SweepPrompt] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(SweepPrompt(len(out), str(obj["prompt"]), str(obj.get("expected", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({e})") from e
    else:
        out = [SweepPrompt(i, line) for i, line in enumerate(x for x in lines if x.strip())]
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def prompts_sha256(prompts: list[SweepPrompt]) -> str:
    return hashlib.sha256("\x00".join(p.text for p in prompts).encode()).hexdigest()
