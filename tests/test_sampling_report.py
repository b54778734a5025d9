"""The PTQ sampling study end to end on the tiny model: runs -> report Table 6 / 7 shapes, the
method x temperature / max tokens / top_k tables and the plots."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import compose

from quantlab.cli import run
from quantlab.tracking.paper_tables import paper_tables
from quantlab.tracking.report import collect, main, summary_table, to_frame

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["eval=[sampling]", "eval.sampling.temperatures=[0.5,1.0]", "eval.sampling.top_ks=[1,20]",
        "eval.sampling.max_new_tokens=[4,8]", "eval.sampling.plots=false"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    import os

    old = os.environ.get("QUANTLAB_RESULTS")
    os.environ["QUANTLAB_RESULTS"] = str(root / "results")
    try:
        run(compose(["+exp=demo_tiny", "quantizer=none", *GRID]), root / "runs" / "fp")
        run(compose(["+exp=demo_tiny", "quantizer=bnb_nf4", *GRID]), root / "runs" / "nf4")
        # the same method as a Hydra multirun over temperature: two runs pooled into one method
        for t in (0.5, 1.0):
            run(compose(["+exp=demo_tiny", "quantizer=bnb_int8", *GRID, f"eval.sampling.temperature={t}"]),
                root / "runs" / f"int8-{t}")
    finally:
        if old is None:
            os.environ.pop("QUANTLAB_RESULTS")
        else:
            os.environ["QUANTLAB_RESULTS"] = old
    return root / "runs"


def _tables(root):
    summary = summary_table(to_frame(collect(root)))
    return dict(paper_tables(summary)), summary


def test_table6_and_table7_shapes(study):
    tables, summary = _tables(study)
    t6 = tables["Table 6 shape: memory footprint GB, 1e9 bytes (model x method)"]
    assert list(t6.columns) == ["model", "bnb.nf4", "bnb.int8", "fp32"]  # the paper's column order
    row = t6.iloc[0]
    assert row["bnb.nf4"] < row["bnb.int8"] < row["fp32"]
    t7 = tables["Table 7 shape: sampling tokens/s (min, max) over generation calls (model x method)"]
    lo = summary.loc[summary["method"] == "bnb.int8", "sampling/tokens_per_s_min"].min()
    hi = summary.loc[summary["method"] == "bnb.int8", "sampling/tokens_per_s_max"].max()
    assert t7.iloc[0]["bnb.int8"] == f"({lo:.2f}, {hi:.2f})"  # min of mins, max of maxes over pooled runs


def test_sampling_tables_pool_runs_and_weight_every_generation_once(study):
    tables, _ = _tables(study)
    where = "demo_tiny / tiny_llama / sampling"
    summ = tables[f"Sampling study {where}: generations and content words per method"]
    assert list(summ["method"]) == ["bnb.nf4", "bnb.int8", "fp32"]
    assert set(summ["generations"]) == {80}  # int8 pooled from two one-temperature runs
    by_t = tables[f"Sampling study {where}: duplicate content words per generation, method x temperature"]
    assert list(by_t.columns) == ["method", "temperature=0.5", "temperature=1"]
    rows = [json.loads(x) for x in (study / "fp" / "sampling_generations.jsonl").read_text().splitlines()]
    df = pd.DataFrame(rows)
    want = df.groupby("temperature")["duplicates"].mean()
    got = by_t.set_index("method").loc["fp32"]
    assert got["temperature=0.5"] == pytest.approx(want[0.5]) and got["temperature=1"] == pytest.approx(want[1.0])


def test_report_cli_prints_the_tables_and_writes_the_plots(study, tmp_path, capsys):
    assert main([str(study), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Table 6 shape" in out and "Table 7 shape" in out and "method x top_k" in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"demo_tiny_tiny_llama_sampling_dup_vs_{x}.png" for x in ("max_new_tokens", "temperature", "top_k")]
    assert "Table 7 shape" in (tmp_path / "report.md").read_text()


def test_sweep_plots_and_tables_reach_the_experiment_tracker(tmp_path, monkeypatch):
    """What W&B receives (through the tracker interface): the three PNGs and the sweep tables."""
    from quantlab.tracking.wandb_logger import Tracker

    seen = {}

    class Recording(Tracker):
        def log_result(self, record, tables, images=None):
            seen.update(tables=set(tables), images=dict(images or {}))

    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr("quantlab.experiment.make_tracker", lambda cfg: Recording())
    grid = ["eval=[sampling]", "eval.sampling.temperatures=[1.0]", "eval.sampling.top_ks=[5]",
            "eval.sampling.max_new_tokens=[4]"]
    rec = run(compose(["+exp=demo_tiny", "quantizer=bnb_fp4", *grid]), tmp_path / "run")
    assert rec.status == "ok"
    assert set(seen["images"]) == {f"sampling_dup_vs_{x}" for x in ("temperature", "max_new_tokens", "top_k")}
    assert all((tmp_path / "run" / f"{k}.png").is_file() for k in seen["images"])
    assert {"sampling_cells", "sampling_calls", "sampling_by_temperature"} <= seen["tables"]
