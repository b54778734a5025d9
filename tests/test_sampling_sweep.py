"""The sampling sweep: grid and seeds, nested == independent plans, resume without duplicates."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import compose

from quantlab.cli import build_spec
from quantlab.errors import ConfigError
from quantlab.evals.sampling.grid import PAPER_MAX_NEW_TOKENS, SamplingGrid, cell_seed
from quantlab.evals.sampling.prompts import ROY2023, load_prompts
from quantlab.evals.sampling.sweep import CALLS, SamplingSweep
from quantlab.metrics.duplicates import duplicate_content_words
from quantlab.types import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(temperatures=(0.5, 1.0), top_ks=(1, 20), max_new_tokens=(4, 9), prompts="roy2023", plots=False)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    return tmp_path


def _ctx(path, fp="run-1"):
    path.mkdir(parents=True, exist_ok=True)
    return RunContext(device=torch.device("cpu"), seed=0, output_dir=path, run_fingerprint=fp, method_label="tiny")


class Killed(BaseException):
    """Stands for a kill (not an Exception: nothing may catch it on the way out)."""


def _rows(path):
    return [json.loads(line) for line in (path / "sampling_generations.jsonl").read_text().splitlines()]


def _key(r):
    return (r["prompt_id"], r["temperature"], r["top_k"], r["max_new_tokens"])


def test_the_paper_grid_and_prompts():
    g = SamplingGrid.build((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0), (1, 5, 10, 20, 50, 100, 200),
                           PAPER_MAX_NEW_TOKENS, nested=False)
    assert g.n_cells * len(ROY2023) == 6300  # the paper's count (section 4)
    assert len(g.calls()) == 630 and len(SamplingGrid.build(g.temperatures, g.top_ks, g.max_new_tokens, True).calls()) == 63
    assert [p.text for p in load_prompts("roy2023")][:2] == ["Life in London", "It is easy to be a techie"]


@pytest.mark.parametrize("field,value", [("temperatures", [0.0]), ("temperatures", []), ("top_ks", [-1]),
                                         ("max_new_tokens", [0]), ("top_ks", [5, 5]), ("temperatures", "hot")])
def test_bad_grid_values_name_their_key(field, value):
    with pytest.raises(ConfigError, match=f"eval.sampling.{field}"):
        SamplingSweep(name="sampling", **{field: value})


def test_cell_seed_depends_on_cell_not_budget():
    assert cell_seed(0, 0.5, 20) == cell_seed(0, 0.5, 20)
    assert len({cell_seed(0, 0.5, 20), cell_seed(0, 0.6, 20), cell_seed(0, 0.5, 50), cell_seed(1, 0.5, 20)}) == 4


def test_nested_plan_gives_the_same_texts_as_one_call_per_combination(tiny, results):
    model, tok = tiny
    nested = SamplingSweep(name="sampling", nested=True, **SMALL).run(model, tok, _ctx(results / "a", "fp-a"))
    indep = SamplingSweep(name="sampling", nested=False, **SMALL).run(model, tok, _ctx(results / "b", "fp-b"))
    a, b = _rows(results / "a"), _rows(results / "b")
    assert len(a) == len(b) == 10 * 8
    assert [(_key(r), r["text"], r["n_new_tokens"]) for r in a] == [(_key(r), r["text"], r["n_new_tokens"]) for r in b]
    assert nested.provenance["sampling/n_generations"]["n_calls"] == 4
    assert indep.provenance["sampling/n_generations"]["n_calls"] == 8
    # budgets are prefixes of one sample (common random numbers); cells differ
    by = {_key(r): r for r in a}
    assert by[(0, 1.0, 20, 9)]["text"].startswith(by[(0, 1.0, 20, 4)]["text"])
    assert by[(0, 1.0, 20, 9)]["text"] != by[(0, 0.5, 20, 9)]["text"]


def test_metrics_tables_and_rows_agree(tiny, results):
    model, tok = tiny
    sweep = SamplingSweep(name="sampling", **{**SMALL, "plots": True})
    res = sweep.run(model, tok, _ctx(results / "run"))
    rows = _rows(results / "run")
    assert len({_key(r) for r in rows}) == len(rows) == 80
    for r in rows:  # every stored count is the metric of the stored continuation
        assert r["duplicates"] == duplicate_content_words(r["text"]).duplicates
        assert r["max_returned_tokens"] == r["prompt_tokens"] + r["max_new_tokens"]
        assert r["n_new_tokens"] <= r["max_new_tokens"]
    m = res.metrics
    assert m["sampling/n_generations"] == 80
    assert m["sampling/dup_words_mean"] == pytest.approx(sum(r["duplicates"] for r in rows) / 80)
    assert m["sampling/content_words_total"] == sum(r["n_content"] for r in rows)
    assert 0 < m["sampling/tokens_per_s_min"] <= m["sampling/tokens_per_s_max"]
    assert sum(c["n"] for c in res.tables["sampling_cells"]) == 80 and len(res.tables["sampling_cells"]) == 8
    assert [r["temperature"] for r in res.tables["sampling_by_temperature"]] == [0.5, 1.0]
    assert {p.name for p in res.images.values()} == {f"sampling_dup_vs_{x}.png" for x in
                                                     ("temperature", "max_new_tokens", "top_k")}
    assert all(p.stat().st_size > 1000 for p in res.images.values())
    prov = res.provenance["sampling/dup_words_mean"]
    assert prov["metric_definition"]["stop_words"].endswith("ENGLISH_STOP_WORDS") and prov["nested"] is True


def test_interrupted_sweep_resumes_without_duplicated_or_lost_generations(tiny, results, monkeypatch):
    model, tok = tiny
    import quantlab.evals.sampling.sweep as sweep_mod

    real, calls = sweep_mod.generate, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed  # the process is killed while the third call generates
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "generate", dies_on_third)
    sweep = SamplingSweep(name="sampling", **SMALL)
    with pytest.raises(Killed):
        sweep.run(model, tok, _ctx(results / "run"))
    store = next((results / "results" / "cache" / "sampling").iterdir())
    assert len((store / CALLS).read_text().splitlines()) == 2
    with (store / CALLS).open("a") as f:  # a torn line from a kill mid-write is skipped
        f.write('{"call": {"key": "T=1.0|k=20|m=9"}, "generat')

    calls.clear()
    res = sweep.run(model, tok, _ctx(results / "run"))
    assert len(calls) == 2  # only the missing calls were generated
    assert res.provenance["sampling/n_generations"]["calls_reused"] == 2
    resumed = _rows(results / "run")
    monkeypatch.setattr(sweep_mod, "generate", real)
    fresh = SamplingSweep(name="sampling", **{**SMALL, "resume": False}).run(model, tok, _ctx(results / "fresh"))
    assert fresh.provenance["sampling/n_generations"]["calls_reused"] == 0
    assert len({_key(r) for r in resumed}) == len(resumed) == 80
    assert resumed == _rows(results / "fresh")


def test_one_temperature_job_reuses_the_grid_store_and_matches_it(tiny, results, monkeypatch):
    """A Hydra multirun over eval.sampling.temperature gives the same generations as the grid."""
    model, tok = tiny
    SamplingSweep(name="sampling", **SMALL).run(model, tok, _ctx(results / "grid"))
    one = SamplingSweep(name="sampling", temperature=1.0, **SMALL)
    res = one.run(model, tok, _ctx(results / "t1"))
    assert res.provenance["sampling/n_generations"]["calls_reused"] == 2
    grid = [r for r in _rows(results / "grid") if r["temperature"] == 1.0]
    assert _rows(results / "t1") == grid


def test_prompt_files_and_bad_sources(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hello", "expected": "greeting"}\n\n{"prompt": "Bye"}\n')
    assert [(p.id, p.text, p.expected) for p in load_prompts(str(f))] == [(0, "Hello", "greeting"), (1, "Bye", "")]
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert [p.text for p in load_prompts(str(t))] == ["one", "two"]
    with pytest.raises(ConfigError, match="eval.sampling.prompts"):
        SamplingSweep(name="sampling", prompts=str(tmp_path / "missing.txt")).preflight()


def test_hydra_config_builds_with_a_multirun_axis():
    spec = build_spec(compose(["+exp=demo_tiny", "eval=[sampling]", "eval.sampling.temperature=0.3",
                               "eval.sampling.top_k=5"]))
    grid = spec.evals[0].grid()
    assert grid.temperatures == (0.3,) and grid.top_ks == (5,) and grid.max_new_tokens == PAPER_MAX_NEW_TOKENS
