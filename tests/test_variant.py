"""Run variants (every setting that can change the numbers, hashed) and what the report does with them:
reruns never duplicate, variants that share a method label never share a cell, seeds pool with a spread."""
from __future__ import annotations

import copy
import json
import re
import socket
import statistics
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from quantlab.cli import build_spec
from quantlab.experiment import calibration_needed
from quantlab.tracking import report
from quantlab.tracking.llmqat_tables import llmqat_table2
from quantlab.tracking.paper_tables import paper_tables, table1
from quantlab.tracking.record import RunRecord, write_record
from quantlab.tracking.runset import SUPERSEDED_TITLE, label_variants, pooled, resolve
from quantlab.tracking.variant import (
    VARIANT_FILE,
    differing_knobs,
    make_variant,
    path_fingerprint,
    variant_id,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _spec(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF.resolve()), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=demo_tiny", *overrides])
    return build_spec(cfg)


def _variant(*overrides: str) -> dict:
    return make_variant(_spec(*overrides))


def _knobs(a: dict, b: dict) -> dict[str, str]:
    return differing_knobs({a["id"]: a["settings"], b["id"]: b["settings"]})


# ----------------------------------------------------------------------------- variants of real configs


def test_id_is_12_hex_stable_and_independent_of_override_order():
    a = _variant("quantizer=gptq", "quantizer.damp=0.02", "calib.n_samples=4")
    b = _variant("quantizer=gptq", "quantizer.damp=0.02", "calib.n_samples=4")
    c = _variant("calib.n_samples=4", "quantizer.damp=0.02", "quantizer=gptq")
    assert re.fullmatch(r"[0-9a-f]{12}", a["id"])
    assert a == b == c
    # the id is the hash of the recorded settings (what the report reads back)
    assert variant_id(a["settings"]) == a["id"]
    assert variant_id(json.loads(json.dumps(a["settings"]))) == a["id"]


def test_seed_experiment_and_tags_are_not_in_the_variant():
    assert _variant("seed=0")["id"] == _variant("seed=1")["id"]
    assert _variant("experiment=a")["id"] == _variant("experiment=b")["id"]
    assert _variant("tags=[x]")["id"] == _variant("tags=[y,z]")["id"]
    assert _variant("save_artifacts=true")["id"] == _variant("save_artifacts=false")["id"]


def test_a_quantizer_knob_changes_the_variant_and_is_named():
    a = _variant("quantizer=gptq", "quantizer.damp=0.01")
    b = _variant("quantizer=gptq", "quantizer.damp=0.02")
    assert a["id"] != b["id"]
    assert _knobs(a, b) == {a["id"]: "damp=0.01", b["id"]: "damp=0.02"}


def test_the_format_changes_the_variant():
    g32 = _variant("quantizer=rtn", "quantizer.format.group_size=32")
    g64 = _variant("quantizer=rtn", "quantizer.format.group_size=64")
    assert g32["id"] != g64["id"]
    assert _knobs(g32, g64) == {g32["id"]: "format.group_size=32", g64["id"]: "format.group_size=64"}
    zin = _variant("quantizer=rtn", "quantizer.format.zero_in_range=true")
    zout = _variant("quantizer=rtn", "quantizer.format.zero_in_range=false")
    assert zin["id"] != zout["id"]
    assert set(_knobs(zin, zout).values()) == {"format.zero_in_range=True", "format.zero_in_range=False"}


def test_execution_only_fields_do_not_change_the_variant():
    a = _variant("quantizer=gptq", "quantizer.batch_size=1")
    b = _variant("quantizer=gptq", "quantizer.batch_size=4")
    assert a["id"] == b["id"]
    assert "batch_size" not in a["settings"]["quantizer"]["config"]
    # where the model runs is recorded in env, not in the variant
    assert _variant("model.device=cpu")["id"] == _variant("model.device=cuda")["id"]


@pytest.mark.parametrize("overrides, needed", [
    (("quantizer=gptq", "eval=[ppl_local]"), True),                # the method calibrates
    (("quantizer=gptq", "eval=[ppl_local,layer_error]"), True),
    (("quantizer=rtn", "eval=[ppl_local,layer_error]"), True),     # layer diagnostics on a quantized model
    (("quantizer=rtn", "eval=[ppl_local]"), False),                # RTN alone needs no data
    (("quantizer=none", "eval=[ppl_local]"), False),
    (("quantizer=none", "eval=[ppl_local,layer_error]"), False),   # nothing quantized: no layer diagnostics
])
def test_calibration_is_in_the_variant_only_when_the_run_builds_it(overrides, needed):
    assert calibration_needed(_spec(*overrides)) is needed
    n4 = _variant(*overrides, "calib.n_samples=4")
    n8 = _variant(*overrides, "calib.n_samples=8")
    if needed:
        assert n4["id"] != n8["id"]
        assert n4["settings"]["calib"]["n_samples"] == 4 and n8["settings"]["calib"]["n_samples"] == 8
        assert _knobs(n4, n8) == {n4["id"]: "calib.n_samples=4", n8["id"]: "calib.n_samples=8"}
    else:
        assert n4["id"] == n8["id"]
        assert n4["settings"]["calib"] is None


def test_reapplied_artifacts_need_no_calibration(tmp_path):
    ov = ("quantizer=gptq", "eval=[ppl_local]", f"quantizer.load_artifacts={tmp_path}")
    assert calibration_needed(_spec(*ov)) is False
    assert _variant(*ov, "calib.n_samples=4")["id"] == _variant(*ov, "calib.n_samples=8")["id"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("building a spec must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_code_evaluator_decoding_knobs(no_network):
    he = ("eval=[humaneval]",)
    # building the spec reads no dataset file: the problems are loaded by preflight, not here
    assert _spec(*he).evals[0].path is None
    greedy = [_variant(*he, f"eval.humaneval.temperature={t}") for t in (0.2, 0.8)]
    assert greedy[0]["id"] == greedy[1]["id"]
    assert "temperature" not in greedy[0]["settings"]["evals"]["humaneval"]
    sampled = [_variant(*he, "eval.humaneval.do_sample=true", f"eval.humaneval.temperature={t}") for t in (0.2, 0.8)]
    assert sampled[0]["id"] != sampled[1]["id"]
    assert _knobs(*sampled) == {sampled[0]["id"]: "humaneval.temperature=0.2",
                                sampled[1]["id"]: "humaneval.temperature=0.8"}
    assert _variant(*he, "eval.humaneval.workers=1")["id"] == _variant(*he, "eval.humaneval.workers=4")["id"]
    plain = _variant(*he, "eval.humaneval.protocol=plain")
    instruct = _variant(*he, "eval.humaneval.protocol=instruct")
    assert plain["id"] != instruct["id"]
    assert set(_knobs(plain, instruct).values()) == {"humaneval.protocol=plain", "humaneval.protocol=instruct"}


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_path_fingerprint_is_names_and_sizes(tmp_path):
    a = _tree(tmp_path / "model_a", {"config.json": b"{}", "sub/model.safetensors": b"x" * 10})
    b = _tree(tmp_path / "elsewhere" / "model_b", {"config.json": b"[]", "sub/model.safetensors": b"y" * 10})
    fa = path_fingerprint(str(a))
    assert re.fullmatch(r"[0-9a-f]{16}", fa)
    assert path_fingerprint(str(b)) == fa  # other content, other directory, same names and sizes
    # hidden files (e.g. .cache) do not count
    _tree(b, {".cache/lock": b"123"})
    assert path_fingerprint(str(b)) == fa
    size = _tree(tmp_path / "c", {"config.json": b"{}", "sub/model.safetensors": b"x" * 11})
    name = _tree(tmp_path / "d", {"config.json": b"{}", "sub/model2.safetensors": b"x" * 10})
    extra = _tree(tmp_path / "e", {"config.json": b"{}", "sub/model.safetensors": b"x" * 10, "tok.json": b""})
    assert len({fa, path_fingerprint(str(size)), path_fingerprint(str(name)), path_fingerprint(str(extra))}) == 4
    assert path_fingerprint(None) is None and path_fingerprint("") is None
    assert path_fingerprint(str(tmp_path / "nope" / "gone_model")) == "missing:gone_model"


# ----------------------------------------------------------------------------- differing_knobs


def _train(lr: float, **extra) -> dict:
    return {"quantizer": {"name": "llm_qat", "config": {"train": {"lr": lr, "steps": 100}, **extra}},
            "evals": {"ppl": {"seqlen": 512}}}


def test_differing_knobs_names_nested_paths_by_their_short_name():
    out = differing_knobs({"a": _train(1e-4), "b": _train(2e-5)})
    assert out == {"a": "train.lr=0.0001", "b": "train.lr=2e-05"}


def test_differing_knobs_caps_the_number_of_knobs():
    a = _train(1e-4, w=1, x=1, y=1)
    b = _train(2e-5, w=2, x=2, y=2)
    out = differing_knobs({"a": a, "b": b}, max_knobs=3)
    # sorted paths: train.lr, w, x, y -> three named, one counted
    assert out == {"a": "train.lr=0.0001 w=1 x=1 +1", "b": "train.lr=2e-05 w=2 x=2 +1"}
    assert differing_knobs({"a": a, "b": b}, max_knobs=4)["a"] == "train.lr=0.0001 w=1 x=1 y=1"


def test_identical_settings_are_told_apart_by_id():
    out = differing_knobs({"0123456789ab": _train(1e-4), "fedcba987654": _train(1e-4)})
    assert out == {"0123456789ab": "v:012345", "fedcba987654": "v:fedcba"}


def test_an_evaluator_only_one_variant_ran_is_named_only_when_needed():
    with_he = _train(1e-4)
    with_he["evals"]["humaneval"] = {"protocol": "plain"}
    # the learning rate already tells them apart: the extra evaluator is not named
    assert differing_knobs({"a": with_he, "b": _train(2e-5)}) == {"a": "train.lr=0.0001", "b": "train.lr=2e-05"}
    # nothing else differs: the evaluator is the label
    assert differing_knobs({"a": with_he, "b": _train(1e-4)}) == {"a": "humaneval=on", "b": "humaneval=-"}
    # a knob of a shared evaluator is a knob like any other
    other = _train(1e-4)
    other["evals"]["ppl"]["seqlen"] = 2048
    assert differing_knobs({"a": _train(1e-4), "b": other}) == {"a": "ppl.seqlen=512", "b": "ppl.seqlen=2048"}


# ----------------------------------------------------------------------------- the audit's demonstration


def _llmqat_settings(lr: float) -> dict:
    return {"model": {"name": "smollm2_135m", "source": "pypi", "dtype": "float32"},
            "quantizer": {"name": "llm_qat", "config": {
                "wakv": "4-8-4", "format": {"bits": 4, "group_size": None, "symmetric": True},
                "train": {"lr": lr, "steps": 200, "batch_size": 1}}},
            "calib": None, "evals": {"local_stdlib": {"kind": "perplexity", "seqlen": 512}}, "version": 1}


def _pipeline_record(run_id: str, quantizer: str, ppl: float, settings: dict | None, *, label: str, wakv: str,
                     fmt: str | None, seed: int = 0, finished: str = "2026-02-01T10:00:00.000+00:00") -> RunRecord:
    return RunRecord(
        run_id=run_id, status="ok", experiment="llmqat_smollm2", output_dir=f"/results/{run_id}",
        started_at="2026-02-01T09:00:00.000+00:00", finished_at=finished,
        model={"name": "smollm2_135m"}, quantizer={"name": quantizer},
        format={"short_name": fmt} if fmt else None,
        metrics={"ppl/local_stdlib": ppl},
        quant_summary={"method_label": label, "wakv": wakv}, seed=seed,
        variant={"id": variant_id(settings), "settings": settings} if settings is not None else None,
    )


def _audit_records(with_variants: bool = True) -> list[RunRecord]:
    fp = _llmqat_settings(0.0)
    fp["quantizer"] = {"name": "none", "config": {}}
    hi, lo = _llmqat_settings(1e-4), _llmqat_settings(2e-5)
    # the two settings differ only in the learning rate
    rest = copy.deepcopy(hi)
    rest["quantizer"]["config"]["train"]["lr"] = 2e-5
    assert rest == lo
    keep = (lambda s: s) if with_variants else (lambda s: None)
    return [
        _pipeline_record("fp", "none", 20.0, keep(fp), label="fp32", wakv="16-16-16", fmt=None),
        _pipeline_record("qat-lr1e-4", "llm_qat", 21.1855, keep(hi), label="llm_qat w4pcs 4-8-4", wakv="4-8-4",
                         fmt="w4pcs"),
        _pipeline_record("qat-lr2e-5", "llm_qat", 26.6096, keep(lo), label="llm_qat w4pcs 4-8-4", wakv="4-8-4",
                         fmt="w4pcs"),
    ]


def _through_the_report(records: list[RunRecord]) -> pd.DataFrame:
    resolved = resolve(records)
    rows = label_variants(resolved.rows)
    return report.summary_table(report.to_frame(pooled(rows)))


def _all_text(tables: list[tuple[str, pd.DataFrame]]) -> str:
    return "\n".join(tab.to_csv(index=False) for _, tab in tables)


def test_two_learning_rates_are_two_rows_never_one_averaged_cell():
    summary = _through_the_report(_audit_records())
    (title, tab), = llmqat_table2(summary)
    col = "smollm2_135m ppl/local_stdlib"
    rows = tab[tab["#Bits"] == "4-8-4"]
    assert len(rows) == 2
    by_method = dict(zip(rows["Method"], rows[col]))
    (hi_label,) = [m for m in by_method if "lr=0.0001" in m]
    (lo_label,) = [m for m in by_method if "lr=2e-05" in m]
    assert by_method[hi_label] == pytest.approx(21.1855, abs=1e-9)
    assert by_method[lo_label] == pytest.approx(26.6096, abs=1e-9)
    assert list(rows["runs"]) == [1, 1]
    pooled_value = statistics.fmean([21.1855, 26.6096])
    assert not any(abs(v - pooled_value) < 1e-3 for v in tab[col].dropna())
    text = _all_text(paper_tables(summary, as_text=True))
    assert "21.1855" in text and "26.6096" in text
    assert "23.8976" not in text and "23.8975" not in text


def test_without_variants_the_two_runs_would_pool():
    """The regression the variants prevent (the check above would catch it): records with no variant are
    indistinguishable, so the Table 2 shape averages them into one cell."""
    summary = _through_the_report(_audit_records(with_variants=False))
    (_, tab), = llmqat_table2(summary)
    rows = tab[tab["#Bits"] == "4-8-4"]
    assert len(rows) == 1 and rows["runs"].iloc[0] == 2
    assert rows["smollm2_135m ppl/local_stdlib"].iloc[0] == pytest.approx(statistics.fmean([21.1855, 26.6096]))


def _two_variants_one_method(kind: str) -> tuple[list[RunRecord], float, float]:
    """Two variants of one method on one model, told apart by label_variants, beside a W-A-KV LLM-QAT run
    (so the experiment grows an LLM-QAT table)."""
    qat = _pipeline_record("qat", "llm_qat", 21.1855, _llmqat_settings(1e-4), label="llm_qat w4pcs 4-8-4",
                           wakv="4-8-4", fmt="w4pcs")
    out = []
    for knob, ppl in ((40, 20.0), (80, 22.0)) if kind == "fp" else ((0.5, 30.0), (0.8, 40.0)):
        s = _llmqat_settings(0.0)
        if kind == "fp":  # the baseline under two perplexity budgets (same metric name)
            s["quantizer"] = {"name": "none", "config": {}}
            s["evals"]["local_stdlib"]["max_windows"] = knob
            out.append(_pipeline_record(f"fp{knob}", "none", ppl, s, label="fp32", wakv="16-16-16", fmt=None))
        else:  # SmoothQuant with its own act_bits=8 (no quantizer.wakv, so no W-A-KV in its label)
            s["quantizer"] = {"name": "smoothquant", "config": {"alpha": knob, "act_bits": 8}}
            out.append(_pipeline_record(f"sq{knob}", "smoothquant", ppl, s, label="smoothquant w4pcs",
                                        wakv="4-8-16", fmt="w4pcs"))
    return [qat, *out], out[0].metrics["ppl/local_stdlib"], out[1].metrics["ppl/local_stdlib"]


@pytest.mark.parametrize("kind", ["fp", "smoothquant_without_wakv"])
def test_llmqat_tables_never_pool_two_variants_of_one_method(kind):
    records, a, b = _two_variants_one_method(kind)
    summary = _through_the_report(records)
    # label_variants did tell them apart
    assert summary["method"].str.contains(" [", regex=False).sum() == 2
    (_, tab), = llmqat_table2(summary)
    col = "smollm2_135m ppl/local_stdlib"
    bits = "16-16-16" if kind == "fp" else "4-8-16"
    rows = tab[tab["#Bits"] == bits]
    assert sorted(rows[col]) == [a, b], f"one averaged cell {list(rows[col])} (runs {list(rows['runs'])})"


# ----------------------------------------------------------------------------- reruns never duplicate


def _rec(run_id: str, status: str = "ok", vid: str | None = "aaaaaaaaaaaa", seed: int = 0,
         finished: str | None = "2026-01-01T10:00:00.000+00:00", experiment: str = "exp",
         started: str = "2026-01-01T09:00:00.000+00:00", **kw) -> RunRecord:
    return RunRecord(run_id=run_id, status=status, experiment=experiment, output_dir=f"/r/{run_id}",
                     started_at=started, finished_at=finished, seed=seed,
                     variant={"id": vid, "settings": {}} if vid else None, **kw)


def _ids(records) -> list[str]:
    return [r.run_id for r in records]


def test_two_ok_records_of_one_variant_and_seed_are_one_row_the_newest():
    old = _rec("old", finished="2026-01-01T10:00:00.000+00:00")
    new = _rec("new", finished="2026-01-02T10:00:00.000+00:00")
    for order in ([old, new], [new, old]):
        res = resolve(order)
        assert _ids(res.rows) == ["new"]
        ((loser, why),) = res.superseded
        assert loser is old and "new" in why and why == "superseded by new (ok)"


def test_an_incomplete_record_is_superseded_by_a_later_ok_one():
    inc = _rec("killed", status="incomplete", finished=None, started="2026-01-01T09:00:00.000+00:00")
    ok = _rec("rerun", finished="2026-01-01T12:00:00.000+00:00", started="2026-01-01T11:00:00.000+00:00")
    res = resolve([inc, ok])
    assert _ids(res.rows) == ["rerun"]
    assert [(r.run_id, why) for r, why in res.superseded] == [("killed", "superseded by rerun (ok)")]


def test_an_older_ok_record_beats_a_newer_failure():
    ok = _rec("ok", finished="2026-01-01T10:00:00.000+00:00")
    failed = _rec("failed", status="failed", finished="2026-01-05T10:00:00.000+00:00")
    res = resolve([ok, failed])
    assert _ids(res.rows) == ["ok"]
    assert [r.run_id for r, _ in res.superseded] == ["failed"]


def test_without_an_ok_record_the_newest_failure_stays():
    f1 = _rec("f1", status="failed", finished="2026-01-01T10:00:00.000+00:00")
    f2 = _rec("f2", status="failed", finished="2026-01-03T10:00:00.000+00:00")
    res = resolve([f2, f1])
    assert _ids(res.rows) == ["f2"] and res.rows[0].status == "failed"
    assert [(r.run_id, why) for r, why in res.superseded] == [("f1", "superseded by f2 (failed)")]


def test_skipped_records_are_never_rows():
    ok = _rec("ok")
    skipped = _rec("skip", status="skipped", finished="2026-01-09T10:00:00.000+00:00",
                   error={"type": "Skipped", "message": "already done", "traceback": None, "existing": "/r/ok"})
    lone = _rec("lone-skip", status="skipped", vid="bbbbbbbbbbbb")
    res = resolve([ok, skipped, lone])
    assert _ids(res.rows) == ["ok"]
    whys = {r.run_id: why for r, why in res.superseded}
    assert set(whys) == {"skip", "lone-skip"} and "/r/ok" in whys["skip"] and whys["skip"].startswith("skipped")


def test_records_without_variant_are_rows_of_their_own_and_seeds_are_rows():
    a, b = _rec("a", vid=None), _rec("b", vid=None)
    s0, s1 = _rec("s0", seed=0), _rec("s1", seed=1)
    other_exp = _rec("x", experiment="other")
    res = resolve([a, b, s0, s1, other_exp])
    assert _ids(res.rows) == ["a", "b", "s0", "s1", "x"] and res.superseded == []


def test_pooled_counts_a_variant_and_seed_once_across_experiments():
    e1 = _rec("e1", experiment="study1", finished="2026-01-01T10:00:00.000+00:00")
    e2 = _rec("e2", experiment="study2", finished="2026-01-02T10:00:00.000+00:00")
    s1 = _rec("s1", experiment="study2", seed=1)
    failed = _rec("f", status="failed", vid="cccccccccccc")
    res = resolve([e1, e2, s1, failed])
    assert _ids(res.rows) == ["e1", "e2", "s1", "f"]  # one row per experiment in the per-experiment tables
    assert _ids(pooled(res.rows)) == ["e2", "s1"]  # the newest of (variant, seed 0); failures never pool


# ----------------------------------------------------------------------------- seeds pool with a spread


def _he_record(run_id: str, seed: int, value: float, label: str = "rtn w4g128a", vid: str = "aaaaaaaaaaaa"):
    return _rec(run_id, seed=seed, vid=vid, model={"name": "codellama_7b"}, quantizer={"name": "rtn"},
                format={"short_name": "w4g128a"}, quant_summary={"method_label": label},
                metrics={"humaneval/pass@1": value})


def test_seeds_of_one_variant_pool_with_mean_sd_and_n():
    values = [0.30, 0.35, 0.41]
    records = [_he_record(f"s{i}", i, v) for i, v in enumerate(values)]
    records.append(_he_record("single", 0, 0.28, label="awq w4g128a", vid="dddddddddddd"))
    res = resolve(records)
    assert len(res.rows) == 4
    summary = report.summary_table(report.to_frame(pooled(label_variants(res.rows))))
    (title, tab), = table1(summary)
    assert "humaneval/pass@1" in title
    cells = tab.set_index("method")
    assert cells.loc["rtn w4g128a", "codellama_7b"] == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert cells.loc["rtn w4g128a", "runs"] == 3 and cells.loc["awq w4g128a", "runs"] == 1
    texts = dict(paper_tables(summary, as_text=True))
    text = texts[title].set_index("method")["codellama_7b"]
    expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n=3)"
    assert expected == "0.3533 ± 0.0551 (n=3)"  # by hand: mean 1.06/3, sd sqrt(0.006067/2)
    assert text["rtn w4g128a"] == expected
    assert text["awq w4g128a"] == "0.2800"


# ----------------------------------------------------------------------------- the report end to end


_SETTINGS = {
    "fp": {"quantizer": {"name": "none", "config": {}}, "model": {"name": "tiny_llama"}},
    "rtn": {"quantizer": {"name": "rtn", "config": {"format": {"bits": 4, "group_size": 64}}},
            "model": {"name": "tiny_llama"}},
}


def _write(root: Path, rel: str, run_id: str, quantizer: str, seed: int, ppl: float | None, finished: str,
           status: str = "ok") -> RunRecord:
    settings = _SETTINGS[quantizer]
    rec = RunRecord(
        run_id=run_id, status=status, experiment="e2e", output_dir=str(root / rel),
        started_at=finished.replace("T10", "T09"), finished_at=finished, model={"name": "tiny_llama"},
        quantizer={"name": quantizer}, format={"short_name": "w4g64a"} if quantizer == "rtn" else None,
        metrics={"ppl/local_stdlib": ppl} if ppl is not None else {}, seed=seed,
        quant_summary={"method_label": "fp32" if quantizer == "none" else "rtn w4g64a"},
        variant={"id": variant_id(settings), "settings": settings},
        error=None if status == "ok" else {"type": "RuntimeError", "message": "boom", "traceback": None},
    )
    write_record(rec, root / rel)
    return rec


def test_report_main_end_to_end(tmp_path, capsys):
    root = tmp_path / "results"
    _write(root, "runs/fp", "run-fp", "fp", 0, 20.0, "2026-01-01T10:00:00.000+00:00")
    _write(root, "runs/rtn_old", "run-rtn-old", "rtn", 0, 25.0, "2026-01-01T10:00:00.000+00:00")
    _write(root, "runs/rtn_new", "run-rtn-new", "rtn", 0, 24.0, "2026-01-02T10:00:00.000+00:00")
    _write(root, "runs/rtn_s1", "run-rtn-s1", "rtn", 1, 24.5, "2026-01-02T10:00:00.000+00:00")
    # a killed rerun of (rtn, seed 1): .hydra and variant.json written, no result.json
    killed = root / "runs/rtn_s1_killed"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra/config.yaml").write_text("experiment: e2e\nseed: 1\n")
    (killed / ".hydra/hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      quantizer: rtn\n      model: tiny_llama\n")
    (killed / VARIANT_FILE).write_text(json.dumps({"id": variant_id(_SETTINGS["rtn"]), "settings": _SETTINGS["rtn"]}))

    assert report.main([str(root)]) == 0
    capsys.readouterr()

    csv = pd.read_csv(root / "report.csv")
    assert len(csv) == 3
    assert not csv.duplicated(["experiment", "variant", "seed"]).any()
    assert set(csv["run_id"]) == {"run-fp", "run-rtn-new", "run-rtn-s1"}
    assert set(csv["variant"]) == {variant_id(_SETTINGS["fp"]), variant_id(_SETTINGS["rtn"])}

    md = (root / "report.md").read_text()
    assert f"## {SUPERSEDED_TITLE}" in md
    footer = md.split(f"## {SUPERSEDED_TITLE}", 1)[1].split("\n## ", 1)[0]
    assert "run-rtn-old" in footer and "superseded by run-rtn-new (ok)" in footer
    assert "runs/rtn_s1_killed" in footer and "superseded by run-rtn-s1 (ok)" in footer
    assert "| incomplete |" in footer
    before_footer = md.split(f"## {SUPERSEDED_TITLE}", 1)[0]
    assert "run-rtn-old" not in before_footer and "rtn_s1_killed" not in before_footer


def test_sampling_sweep_slices_share_one_label_and_other_knobs_do_not():
    """One job per temperature of Roy's grid is one study (its tables join the slices); a different prompt set
    is a different variant with its own label. Both stay distinct variants (never deduplicated as reruns)."""
    def rec(run_id: str, temperature: float, prompts: str) -> RunRecord:
        settings = {"model": {"name": "smollm2_135m"}, "quantizer": {"name": "bnb", "config": {"mode": "nf4"}},
                    "calib": None, "evals": {"sampling": {"kind": "sampling_sweep", "temperature": temperature,
                                                          "top_k": None, "prompts": prompts}}, "version": 1}
        variant = {"id": variant_id(settings), "settings": settings,
                   "slices": ["evals.sampling.temperature", "evals.sampling.top_k"]}
        return RunRecord(run_id=run_id, status="ok", experiment="ptq", output_dir=f"/r/{run_id}",
                         started_at=f"2026-02-01T09:00:0{run_id[-1]}", model={"name": "smollm2_135m"},
                         quantizer={"name": "bnb"}, quant_summary={"method_label": "bnb.nf4"}, variant=variant)

    records = [rec("a1", 0.1, "roy2023"), rec("a2", 0.7, "roy2023"), rec("a3", 0.1, "mine.txt")]
    resolved = resolve(records)
    assert len(resolved.rows) == 3 and not resolved.superseded  # three variants, no rerun
    labels = {r.run_id: r.quant_summary.get("display_label", r.quant_summary["method_label"])
              for r in label_variants(resolved.rows)}
    assert labels["a1"] == labels["a2"]  # the two temperature slices: one label
    assert labels["a1"] != labels["a3"] and "prompts=mine.txt" in labels["a3"]
    assert "temperature" not in labels["a1"] + labels["a3"]
