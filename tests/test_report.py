"""collect / summary / report CLI and the Hydra PrintReport callback."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from quantlab.tracking.callbacks import PrintReport
from quantlab.tracking.record import RunRecord, write_record
from quantlab.tracking.report import (
    collect,
    format_cell,
    main,
    render_markdown,
    summary_table,
    to_frame,
)

FMT = {"bits": 4, "group_size": 128, "symmetric": False, "kind": "int", "zero_in_range": False,
       "scale_bits": 16, "short_name": "w4g128a"}


def _record(run_dir: Path, run_id: str, quantizer: str, started: str, **kw) -> RunRecord:
    rec = RunRecord(
        run_id=run_id, status=kw.pop("status", "ok"), experiment=kw.pop("experiment", "w4_methods"),
        output_dir=str(run_dir), started_at=started, wall_s=kw.pop("wall_s", 61.26),
        model={"name": "tiny-llama"}, quantizer={"name": quantizer, "config": {}},
        format=None if quantizer == "none" else FMT,
        bits_per_weight=None if quantizer == "none" else 4.15625,
        quant_time_s=kw.pop("quant_time_s", 2.04), peak_memory={"peak_rss_gb": 1.234},
        seed=0, **kw,
    )
    (run_dir / ".hydra").mkdir(parents=True)
    write_record(rec, run_dir)
    return rec


@pytest.fixture()
def results_tree(tmp_path: Path) -> Path:
    """2 ok runs, 1 failed, 1 corrupt result.json, 1 killed run (``.hydra`` only)."""
    root = tmp_path / "results"
    # awq sorts before none alphabetically and starts earlier: the summary must still put none first
    _record(root / "runs/a", "20260101-120000-aaaaaa", "awq", "2026-01-01T12:00:00.000+00:00",
            metrics={"ppl/local_stdlib": 12.345678, "err/sqnr_db": 20.0})
    _record(root / "runs/b", "20260101-130000-bbbbbb", "none", "2026-01-01T13:00:00.000+00:00",
            metrics={"ppl/local_stdlib": 11.0})
    _record(root / "sweeps/s1/0", "20260101-110000-cccccc", "gptq", "2026-01-01T11:00:00.000+00:00",
            status="failed", metrics={},
            error={"type": "ConfigError", "message": "quantizer.format.group_size: 96 does not divide 64",
                   "traceback": "Traceback ..."})
    corrupt = root / "runs/corrupt"
    (corrupt / ".hydra").mkdir(parents=True)
    (corrupt / "result.json").write_text('{"run_id": "x", "status": ')
    killed = root / "sweeps/s1/1/.hydra"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text("seed: 3\nexperiment: w4_methods\n")
    (killed / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      quantizer: rtn\n      model: tiny_llama\n")
    (killed / "overrides.yaml").write_text("- quantizer=rtn\n- seed=3\n")
    return root


def test_collect_ok_failed_incomplete_and_skips_corrupt(results_tree, caplog):
    with caplog.at_level(logging.WARNING):
        records = collect(results_tree)
    assert "runs/corrupt/result.json" in caplog.text
    by_status = {}
    for r in records:
        by_status.setdefault(r.status, []).append(r)
    assert {k: len(v) for k, v in by_status.items()} == {"ok": 2, "failed": 1, "incomplete": 1}
    (inc,) = by_status["incomplete"]
    assert inc.experiment == "w4_methods" and inc.quantizer == {"name": "rtn"} and inc.model == {"name": "tiny_llama"}
    assert inc.seed == 3 and inc.overrides == ["quantizer=rtn", "seed=3"] and inc.run_id == "sweeps/s1/1"
    assert inc.output_dir == str(results_tree / "sweeps/s1/1") and inc.metrics == {}
    # sorted by (experiment, started_at): the failed 11:00 run first; the incomplete one (mtime now) last
    assert [r.run_id for r in records][:3] == ["20260101-110000-cccccc", "20260101-120000-aaaaaa",
                                               "20260101-130000-bbbbbb"]


def test_summary_columns_and_none_first(results_tree):
    df = to_frame(collect(results_tree))
    assert len(df) == 4
    summary = summary_table(df)
    assert list(summary.columns) == [
        "experiment", "model", "quantizer", "format", "wakv", "bits_per_weight", "seed",
        "err/sqnr_db", "ppl/local_stdlib", "quant_time_s", "wall_s", "peak_rss_gb", "status", "run_id", "model_note",
        "method", "output_dir", "calibrated_on_eval_set", "variant"]
    # tiny-llama rows (none first, then awq, gptq), then the incomplete tiny_llama row
    assert list(summary["quantizer"]) == ["none", "awq", "gptq", "rtn"]
    assert list(summary["status"]) == ["ok", "ok", "failed", "incomplete"]
    assert list(summary["format"].fillna("<NA>")) == ["fp", "w4g128a", "w4g128a", "<NA>"]
    assert summary.loc[0, "ppl/local_stdlib"] == 11.0 and summary.loc[1, "ppl/local_stdlib"] == 12.345678
    assert pd.isna(summary.loc[2, "ppl/local_stdlib"]) and pd.isna(summary.loc[3, "ppl/local_stdlib"])
    assert list(summary_table(df, ["ppl"]).columns)[7:8] == ["ppl/local_stdlib"]  # prefix selection
    with pytest.raises(ValueError, match="unknown metric"):
        summary_table(df, ["acc/arc_easy"])


def test_format_cell_and_markdown():
    assert format_cell("ppl/wikitext2", 5.472112) == "5.4721"
    assert format_cell("wall_s", 61.26) == "61.3"
    assert format_cell("bits_per_weight", 4.15625) == "4.15625"
    assert format_cell("bits_per_weight", 4 + 20 / 1024) == "4.01953125"
    assert format_cell("bits_per_weight", 4.125) == "4.125"
    assert format_cell("peak_rss_gb", 1.234) == "1.23"
    assert format_cell("ppl/x", float("nan")) == "-" and format_cell("ppl/x", None) == "-"
    assert format_cell("ppl/x", float("inf")) == "inf"
    assert format_cell("seed", 3.0) == "3"
    md = render_markdown(pd.DataFrame({"name": ["a|b"], "ppl/x": [1.0]}))
    assert md.splitlines() == ["| name | ppl/x |", "|---|---:|", "| a\\|b | 1.0000 |"]


def test_report_main_writes_outputs(results_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(results_tree), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "w4_methods" in stdout and "12.3457" in stdout and "11.0000" in stdout and "61.3" in stdout
    assert f"wrote {out / 'report.csv'}" in stdout
    csv_df = pd.read_csv(out / "report.csv")
    assert len(csv_df) == 4 and set(csv_df["status"]) == {"ok", "failed", "incomplete"}
    assert csv_df.set_index("run_id").loc["20260101-120000-aaaaaa", "ppl/local_stdlib"] == 12.345678
    md = (out / "report.md").read_text()
    assert md.index("| tiny-llama | none |") < md.index("| tiny-llama | awq |")
    assert "96 does not divide 64" not in md  # errors live in report.csv, the table shows status
    assert "| failed |" in md and "| incomplete |" in md
    pq = pd.read_parquet(out / "report.parquet")
    assert len(pq) == 4 and sorted(pq["ppl/local_stdlib"].dropna()) == [11.0, 12.345678]
    assert "quantizer.format.group_size: 96 does not divide 64" in set(pq["error"].dropna())


def test_report_main_filters_and_errors(results_tree, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run records" in err
    assert main([str(tmp_path / "missing")]) == 1
    assert main([str(results_tree), "--experiment", "other"]) == 1
    assert main([str(results_tree), "--metrics", "acc/arc_easy"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main([str(results_tree), "--metrics", "ppl", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "ppl/local_stdlib" in md and "err/sqnr_db" not in md
    assert (results_tree / "report.csv").exists() is False  # --out respected


def test_print_report_callback_run_and_multirun(results_tree, capsys):
    cb = PrintReport()
    cb.on_run_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(results_tree / "runs/a")}}}))
    out = capsys.readouterr().out
    assert "12.3457" in out and "11.0000" not in out  # only that run
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(results_tree / "sweeps/s1")}}}))
    out = capsys.readouterr().out
    assert "gptq" in out and "incomplete" in out and "awq" not in out
    # a broken config never raises
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "${oops}"}}}))
    cb.on_run_end(OmegaConf.create({}))


def test_print_report_callback_in_real_hydra_runs(tmp_path):
    """Hydra 1.3 calls on_multirun_end with a config whose sweep.dir (with ${now:}) resolves to the
    jobs' dir, and on_run_end with the run's output_dir (subprocesses: ~1.5 s each)."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(textwrap.dedent("""\
        q: none
        hydra:
          run: {dir: out/run}
          sweep: {dir: "out/sweep/${now:%Y-%m-%d_%H-%M-%S-%f}", subdir: "${hydra.job.num}"}
          callbacks:
            report: {_target_: quantlab.tracking.callbacks.PrintReport}
        """))
    (tmp_path / "app.py").write_text(textwrap.dedent("""\
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from quantlab.tracking.record import RunRecord, utc_now_iso, write_record

        @hydra.main(version_base="1.3", config_path="conf", config_name="config")
        def app(cfg):
            out = HydraConfig.get().runtime.output_dir
            rec = RunRecord(run_id=f"job-{cfg.q}", status="ok", experiment="e2e",
                            output_dir=out, started_at=utc_now_iso(), model={"name": "m"},
                            quantizer={"name": cfg.q}, metrics={"ppl/x": 10.0 if cfg.q == "none" else 12.5})
            write_record(rec, out)

        if __name__ == "__main__":
            app()
        """))
    proc = subprocess.run([sys.executable, "app.py", "-m", "q=rtn,none"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "e2e" in proc.stdout and "10.0000" in proc.stdout and "12.5000" in proc.stdout
    table = proc.stdout[proc.stdout.index("e2e"):]  # after Hydra's "Launching" log lines
    assert table.index("none") < table.index("rtn")
    assert "PrintReport" not in proc.stderr  # no swallowed error
    # RUN mode: on_run_end gets hydra.runtime.output_dir -> only this run's table
    proc = subprocess.run([sys.executable, "app.py", "q=awq"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "12.5000" in proc.stdout and "awq" in proc.stdout and "none" not in proc.stdout
    assert (tmp_path / "out/run/result.json").is_file() and "PrintReport" not in proc.stderr


def test_method_labels_without_a_format_column_fall_back_to_the_quantizer():
    import pandas as pd

    from quantlab.tracking.cells import method_labels

    df = pd.DataFrame({"quantizer": ["rtn", None]})
    assert list(method_labels(df)) == ["rtn", "?"]
