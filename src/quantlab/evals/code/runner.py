"""Code-generation evaluation, written once for every dataset: generate -> sandbox -> pass@k.

Flow of :meth:`CodeEval.run`: load the problems (subclass), build one prompt per problem under the
chosen prompt protocol (:mod:`quantlab.evals.code.protocols`: ``plain``, ``chat``, ``instruct``,
``sqplus``), generate the missing completions (batched, resumable), turn each reply into the tested
completion (the protocol's post-processing), run every not-yet-judged one in the sandbox in
parallel, judge it, and report unbiased pass@k per language and overall, with the per-problem
pass@k in ``EvalResult.per_item`` (paired comparisons between methods). Completions and outcomes
are appended to a :class:`~quantlab.evals.code.store.SampleStore` as they finish; the store lives under
``<results>/cache/code_eval/<fingerprint>`` when the harness provides a run fingerprint (same
model + method + settings + quantlab source), so rerunning the same command resumes, and a copy of
the final files goes to ``<run dir>/<eval name>/``.
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from quantlab.errors import ConfigError
from quantlab.evals.base import Evaluator
from quantlab.evals.code.passk import pass_at_k, usable_ks
from quantlab.evals.code.problem import CodeProblem, Verdict
from quantlab.evals.code.protocols import PROTOCOLS, PromptProtocol, SqPlus, make_protocol
from quantlab.evals.code.store import SampleStore
from quantlab.execution import Program, Sandbox
from quantlab.execution.sandbox import ISOLATIONS
from quantlab.execution.toolchains import with_run_limits
from quantlab.generation import Completion, DecodingConfig, GenRequest, generate
from quantlab.types import EvalResult, RunContext
from quantlab.utils.checks import is_int
from quantlab.utils.hashing import fingerprint
from quantlab.utils.paths import results_root

log = logging.getLogger(__name__)

HARNESS = "quantlab.code_eval"
EXEC_CHUNK = 64  # outcomes are persisted every EXEC_CHUNK programs


@dataclass(frozen=True)
class CodeEval(Evaluator):
    """Shared settings of the code benchmarks (HumanEval, BabelCode, MultiPL-E).

    Attributes:
        do_sample, temperature, top_k, top_p, n_samples, batch_size, backend, tensor_parallel_size: decoding
            (:class:`~quantlab.generation.DecodingConfig`); default greedy pass@1 as in the
            SmoothQuant+ paper.
        max_new_tokens: generation budget; ``None`` = the protocol's (plain/chat 512, instruct 768
            as EvalPlus, sqplus 2048 as the paper).
        seed: sampling seed (``None``: the run's seed).
        k: pass@k values to report; those larger than ``n_samples`` are dropped.
        stop: stop sequences replacing the dataset's (``None``: the dataset's per-language ones).
        limit: evaluate only the first ``limit`` problems (quick runs; recorded).
        protocol: ``plain`` | ``chat`` | ``instruct`` | ``sqplus``
            (:mod:`quantlab.evals.code.protocols`); recorded with every metric.
        instruction: ``chat``'s instruction (``{language}`` is filled in) or ``instruct``'s
            instruction prefix; ``None`` = the protocol's default.
        response_prefix: ``instruct``'s pre-filled start of the reply; ``None`` = EvalPlus's.
        workers: parallel sandboxed programs.
        isolation: sandbox isolation (``auto`` / ``bwrap`` / ``none``), see :mod:`quantlab.execution`.
        timeout_s: wall-clock limit of each program's run step (``None``: the toolchain default);
            compile steps keep the toolchain's own limits (MultiPL-E Go compiles inside its
            ``go test`` run step, so keep this generous there).
        resume: reuse completions/outcomes of an earlier run with identical settings.
    """

    do_sample: bool = False
    temperature: float = 0.2
    top_k: int = 0
    top_p: float = 0.95
    n_samples: int = 1
    max_new_tokens: int | None = None
    batch_size: int = 16
    backend: str = "auto"
    tensor_parallel_size: int | str = 1
    seed: int | None = None
    k: tuple[int, ...] = (1, 10, 100)
    stop: tuple[str, ...] | None = None
    limit: int | None = None
    protocol: str = "plain"
    instruction: str | None = None
    response_prefix: str | None = None
    workers: int = 4
    isolation: str = "auto"
    timeout_s: float | None = None
    resume: bool = True

    #: report pass@k per language and their average (BabelCode / MultiPL-E)
    per_language: ClassVar[bool] = False
    execution_fields: ClassVar[tuple[str, ...]] = ("workers", "resume")
    neutral_settings: ClassVar[dict[str, Any]] = {"tensor_parallel_size": 1}  # added 2026-12

    def __post_init__(self) -> None:
        key = f"eval.{self.name or self.kind}"
        for fld in ("k", "stop"):
            val = getattr(self, fld)
            if isinstance(val, list):
                object.__setattr__(self, fld, tuple(val))
        if not self.k or not all(is_int(x) and x >= 1 for x in self.k):
            raise ConfigError(f"{key}.k", f"must be a list of integers >= 1, got {self.k!r}")
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            raise ConfigError(f"{key}.limit", f"must be an integer >= 1 or null, got {self.limit!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{key}.protocol", f"must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        self.prompt_protocol()  # validates instruction / response_prefix against the protocol
        if not is_int(self.workers) or self.workers < 1:
            raise ConfigError(f"{key}.workers", f"must be an integer >= 1, got {self.workers!r}")
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"{key}.isolation", f"must be one of {list(ISOLATIONS)}, got {self.isolation!r}")
        if self.timeout_s is not None and (not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0):
            raise ConfigError(f"{key}.timeout_s", f"must be > 0 or null, got {self.timeout_s!r}")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"{key}.stop", f"must be a list of non-empty strings, got {self.stop!r}")
        self.decoding(0)  # validates the decoding fields under this evaluator's key

    # --- what subclasses provide --------------------------------------------------------------------
    def variant_settings(self) -> dict[str, Any]:
        """As the base class, without the sampling knobs of a greedy run (they cannot change its numbers)."""
        out = super().variant_settings()
        if not self.do_sample:
            for key in ("temperature", "top_k", "top_p", "seed"):
                out.pop(key, None)
        return out

    @abstractmethod
    def load_problems(self) -> tuple[list[CodeProblem], dict[str, Any]]:
        """All problems of the dataset (before ``limit``) and the dataset's provenance."""

    def select(self, problems: list[CodeProblem]) -> list[CodeProblem]:
        """The problems evaluated: the first ``limit`` (all when ``None``)."""
        return problems if self.limit is None else problems[: self.limit]

    def sandbox(self) -> Sandbox:
        try:
            return Sandbox(isolation=self.isolation, workers=self.workers)
        except ConfigError as e:  # name this evaluator's key, not the library's
            raise ConfigError(f"eval.{self.name}.isolation", str(e).split(": ", 1)[-1]) from None

    def preflight(self) -> None:
        """Load the problems and probe the sandbox before quantizing (a missing file, hub access or
        bubblewrap fails early)."""
        self.sandbox()
        problems, _ = self.load_problems()
        if not self.select(problems):
            raise ConfigError(f"eval.{self.name}", "no problems to evaluate")

    # --- building blocks ---------------------------------------------------------------------------
    def prompt_protocol(self) -> PromptProtocol:
        return make_protocol(self.protocol, f"eval.{self.name or self.kind}", self.instruction, self.response_prefix)

    def check_model(self, model: nn.Module, tokenizer: Any) -> None:
        """Before quantizing: the protocol works with this tokenizer (e.g. instruct needs a chat template)."""
        problems, _ = self.load_problems()
        for p in self.select(problems)[:1]:
            self.request(p, tokenizer)

    def calibration_overlap(self, calib: dict[str, Any]) -> bool:
        """HumanEval, BabelCode and MultiPL-E all pose the HumanEval problems: a calibration set of the
        HumanEval prompts (SmoothQuant+'s) is drawn from this evaluation's own items."""
        return calib.get("name") == "humaneval"

    def decoding(self, run_seed: int) -> DecodingConfig:
        budget = self.max_new_tokens if self.max_new_tokens is not None else self.prompt_protocol().default_max_new_tokens
        return DecodingConfig(
            do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            n=self.n_samples, max_new_tokens=budget, batch_size=self.batch_size,
            seed=self.seed if self.seed is not None else run_seed, backend=self.backend,
            tensor_parallel_size=self.tensor_parallel_size,
            key=f"eval.{self.name or self.kind}",
        )

    def request(self, problem: CodeProblem, tokenizer: Any) -> GenRequest:
        """The generation request of one problem under the protocol (``stop`` replaces its stops)."""
        return self.prompt_protocol().request(problem, tokenizer, tuple(self.stop) if self.stop is not None else None)

    def program(self, problem: CodeProblem, completion: str) -> Program:
        """``problem.program`` with this eval's run-step timeout (wall clock and CPU) applied."""
        prog = problem.program(completion)
        if self.timeout_s is None:
            return prog
        return with_run_limits(prog, timeout_s=float(self.timeout_s), cpu_s=float(self.timeout_s))

    def _store(self, ctx: RunContext, meta: dict[str, Any]) -> SampleStore:
        if self.resume and ctx.run_fingerprint:
            key = fingerprint({"run": ctx.run_fingerprint, **meta})
            return SampleStore(results_root() / "cache" / "code_eval" / f"{self.name}-{key[:20]}", meta)
        return SampleStore(ctx.output_dir / self.name / ".work", meta)

    # --- the evaluation ----------------------------------------------------------------------------
    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        problems, data_prov = self.load_problems()
        n_total = len(problems)
        problems = self.select(problems)
        if not problems:
            raise ConfigError(f"eval.{self.name}", "no problems to evaluate")
        decoding = self.decoding(ctx.seed)
        protocol = self.prompt_protocol()
        requests = [self.request(p, tokenizer) for p in problems]
        deviations = (protocol.deviations(decoding.do_sample, decoding.max_new_tokens, self.stop)
                      if isinstance(protocol, SqPlus) else [])
        if deviations:
            log.warning("%s: protocol sqplus with settings that differ from the paper's harness: %s",
                        self.name, "; ".join(deviations))
        # batch size does not change completions (tested): a rerun with another one still resumes
        meta = {
            "eval": self.kind, "decoding": {k: v for k, v in decoding.describe().items() if k != "batch_size"},
            "protocol": protocol.describe(),
        }
        store = self._store(ctx, meta)
        completions, gen_stats = self._generate(model, tokenizer, problems, requests, decoding, store)
        sandbox = self.sandbox()
        verdicts, outcome_rows = self._execute(sandbox, problems, completions, store, protocol)
        store.export(ctx.output_dir / self.name, {p.task_id: completions[p.task_id] for p in problems}, outcome_rows)
        prov = {
            "harness": HARNESS, "dataset": {**data_prov, "n_problems_total": n_total, "limit": self.limit},
            "n_problems": len(problems), "n_samples": decoding.n, **decoding.describe(),
            "stop": sorted({s for r in requests for s in r.stop}), "protocol": protocol.name,
            "protocol_spec": protocol.describe(), "protocol_deviations": deviations,
            "sandbox": sandbox.describe(), "run_timeout_s": self.timeout_s,
            "generation": gen_stats, "outcomes": dict(Counter(r["status"] for r in outcome_rows)),
            "finish_reasons": dict(Counter(c.finish_reason for p in problems for c in completions[p.task_id])),
            "store": str(store.dir),
        }
        return self._aggregate(problems, verdicts, decoding.n, prov)

    def _generate(
        self, model: nn.Module, tokenizer: Any, problems: list[CodeProblem], requests: list[GenRequest],
        decoding: DecodingConfig, store: SampleStore,
    ) -> tuple[dict[str, list[Completion]], dict[str, Any]]:
        keys = [store.request_key(r.prompt, r.stop) for r in requests]
        stored = store.load_completions()
        done = {
            p.task_id: stored[p.task_id][1] for p, key in zip(problems, keys)
            if p.task_id in stored and stored[p.task_id][0] == key and len(stored[p.task_id][1]) == decoding.n
        }
        todo = [i for i, p in enumerate(problems) if p.task_id not in done]
        if len(todo) < len(problems):
            log.info("%s: resuming, %d/%d prompts already generated", self.name, len(problems) - len(todo), len(problems))

        def persist(idx: list[int], comps: list[list[Completion]]) -> None:
            store.append_completions([(problems[todo[j]].task_id, keys[todo[j]], c) for j, c in zip(idx, comps)])

        outs, stats = generate(
            model, tokenizer, [requests[i] for i in todo], decoding, desc=f"{self.name}: generate", on_batch=persist
        )
        for j, i in enumerate(todo):
            done[problems[i].task_id] = outs[j]
        return done, {**stats.describe(), "resumed_prompts": len(problems) - len(todo)}

    def _execute(
        self, sandbox: Sandbox, problems: list[CodeProblem], completions: dict[str, list[Completion]],
        store: SampleStore, protocol: PromptProtocol,
    ) -> tuple[dict[str, list[Verdict]], list[dict[str, Any]]]:
        exec_key = fingerprint({"sandbox": sandbox.describe(), "run_timeout_s": self.timeout_s,
                                "protocol": protocol.describe()})
        cached = store.load_outcomes()
        rows: dict[str, dict[str, Any]] = {}
        jobs: list[tuple[str, CodeProblem, int, str, str]] = []
        for p in problems:
            for s, c in enumerate(completions[p.task_id]):
                key = store.outcome_key(p.task_id, s, c.text, exec_key)
                if key in cached:
                    rows[key] = cached[key]
                else:
                    text, note = protocol.completion(p, c)
                    jobs.append((key, p, s, text, note))
        if cached and len(jobs) < sum(len(completions[p.task_id]) for p in problems):
            log.info("%s: %d outcomes reused from %s", self.name, len(rows), store.dir)
        for start in range(0, len(jobs), EXEC_CHUNK):
            chunk = jobs[start : start + EXEC_CHUNK]
            results = sandbox.run_many([self.program(p, text) for _, p, _, text, _ in chunk])
            new = []
            for (key, p, s, text, note), res in zip(chunk, results):
                v = p.judge(res)
                row: dict[str, Any] = {"key": key, "task_id": p.task_id, "language": p.language, "sample": s,
                                       "status": v.status, "error": v.error,
                                       "wall_s": round(sum(x.wall_s for x in res.steps), 3)}
                if note:  # the protocol post-processed the reply: keep what was tested, and how
                    row.update(tested_completion=text, post_processing=note)
                rows[key] = row
                new.append(row)
            store.append_outcomes(new)
            log.info("%s: executed %d/%d programs", self.name, min(start + EXEC_CHUNK, len(jobs)), len(jobs))
        verdicts: dict[str, list[Verdict]] = {p.task_id: [] for p in problems}
        ordered = []
        for p in problems:
            for s, c in enumerate(completions[p.task_id]):
                row = rows[store.outcome_key(p.task_id, s, c.text, exec_key)]
                verdicts[p.task_id].append(Verdict(row["status"], row.get("error", "")))
                ordered.append(row)
        return verdicts, ordered

    def _aggregate(
        self, problems: list[CodeProblem], verdicts: dict[str, list[Verdict]], n: int, prov: dict[str, Any]
    ) -> EvalResult:
        ks = usable_ks(self.k, n)
        groups: dict[str, list[CodeProblem]] = {}
        for p in problems:
            groups.setdefault(p.language if self.per_language else "", []).append(p)
        res = EvalResult()
        table = []
        for p in problems:
            vs = verdicts[p.task_id]
            c = sum(v.passed for v in vs)
            first_err = next((v.error for v in vs if not v.passed), "")
            table.append({"task_id": p.task_id, "language": p.language, "n": len(vs), "passed": c,
                          **{f"pass@{k}": pass_at_k(len(vs), c, k) for k in ks},
                          "statuses": ",".join(v.status for v in vs), "first_error": first_err[:200]})
        for group, members in groups.items():
            prefix = f"{self.name}/{group}" if group else self.name
            for k in ks:
                per = {p.task_id: pass_at_k(len(verdicts[p.task_id]), sum(v.passed for v in verdicts[p.task_id]), k)
                       for p in members}
                res.metrics[f"{prefix}/pass@{k}"] = float(np.mean(list(per.values())))
                res.per_item[f"{prefix}/pass@{k}"] = per  # paired comparisons between runs (report)
                res.provenance[f"{prefix}/pass@{k}"] = {**prov, "language": group or members[0].language,
                                                        "n_problems": len(members), "k": k}
        if self.per_language:
            for k in ks:
                vals = [res.metrics[f"{self.name}/{g}/pass@{k}"] for g in groups]
                res.metrics[f"{self.name}/avg/pass@{k}"] = float(np.mean(vals))
                res.provenance[f"{self.name}/avg/pass@{k}"] = {**prov, "language": "avg", "k": k,
                                                               "languages": sorted(groups), "average": "unweighted"}
        gen = prov["generation"]
        if gen.get("resumed_prompts", 0) == 0 and gen.get("generated_tokens"):
            res.metrics[f"{self.name}/tokens_per_s"] = float(gen["tokens_per_s"])
            res.provenance[f"{self.name}/tokens_per_s"] = {**prov, "unit": "generated tokens per second"}
        res.tables[f"{self.name}_problems"] = table
        return res
