"""Completions and outcomes on disk (jsonl), so an interrupted or repeated run resumes.

A store is a directory with ``meta.json`` (the fingerprint of everything that determines the
completions), ``completions.jsonl`` (one line per prompt: its ``n`` completions) and
``outcomes.jsonl`` (one line per executed completion, keyed by the completion's hash and the
execution settings). Lines are appended and flushed as work finishes; a half-written last line (a
killed process) is ignored on reading. A store whose fingerprint differs from the current run is
never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from quantlab.errors import DataError
from quantlab.generation import Completion
from quantlab.utils.hashing import fingerprint
from quantlab.utils.jsonl import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

META = "meta.json"
COMPLETIONS = "completions.jsonl"
OUTCOMES = "outcomes.jsonl"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SampleStore:
    """Append-only completions/outcomes for one (model, eval settings) fingerprint."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.meta = meta
        self.key = fingerprint(meta)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / META
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DataError(f"{meta_path}: unreadable store metadata ({e}); delete the folder") from e
            if old.get("key") != self.key:
                log.warning("%s holds samples of other settings; starting afresh", self.dir)
                for name in (COMPLETIONS, OUTCOMES):
                    (self.dir / name).unlink(missing_ok=True)
        tmp = meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, **meta}, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, meta_path)

    # completions ----------------------------------------------------------------------------------
    @staticmethod
    def request_key(prompt: str, stop: tuple[str, ...]) -> str:
        """Identity of a generation request: its exact prompt and stop sequences."""
        return text_hash("\x00".join((prompt, *stop)))

    def load_completions(self) -> dict[str, tuple[str, list[Completion]]]:
        """``task_id -> (request key, completions)`` of every prompt that finished generating."""
        out: dict[str, tuple[str, list[Completion]]] = {}
        for row in read_jsonl(self.dir / COMPLETIONS):
            try:
                out[row["task_id"]] = (row["request"], [Completion(**c) for c in row["completions"]])
            except (KeyError, TypeError):
                log.warning("%s: ignoring a malformed completions line", self.dir / COMPLETIONS)
        return out

    def append_completions(self, rows: list[tuple[str, str, list[Completion]]]) -> None:
        """Append ``(task_id, request key, completions)`` rows."""
        append_jsonl(self.dir / COMPLETIONS, (
            {"task_id": task_id, "request": request, "completions": [c.record() for c in comps]}
            for task_id, request, comps in rows
        ))

    # outcomes -------------------------------------------------------------------------------------
    @staticmethod
    def outcome_key(task_id: str, sample: int, completion: str, exec_key: str) -> str:
        return f"{task_id}#{sample}#{text_hash(completion)}#{exec_key[:16]}"

    def load_outcomes(self) -> dict[str, dict[str, Any]]:
        return {row["key"]: row for row in read_jsonl(self.dir / OUTCOMES) if "key" in row}

    def append_outcomes(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.dir / OUTCOMES, rows)

    def export(self, dest: Path, completions: dict[str, list[Completion]], outcomes: list[dict[str, Any]]) -> None:
        """Write this run's final completions and outcomes (only the current ones) to ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        with (dest / COMPLETIONS).open("w", encoding="utf-8") as f:
            for task_id, comps in completions.items():
                f.write(json.dumps({"task_id": task_id, "completions": [c.record() for c in comps]}) + "\n")
        with (dest / OUTCOMES).open("w", encoding="utf-8") as f:
            for row in outcomes:
                f.write(json.dumps(row) + "\n")
        if (self.dir / META).resolve() != (dest / META).resolve():
            shutil.copyfile(self.dir / META, dest / META)
