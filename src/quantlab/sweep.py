"""Sweeps that survive a bad job and resume after a kill; one command line that is a single job is a run.

* :func:`find_existing`: a sweep job is skipped when its experiment, variant and seed already have an
  ``ok`` record anywhere under the results root (``rerun=true`` forces it); the job's directory then gets a
  ``skipped`` record naming the earlier run, which the report shows in place of the job.
* :func:`failed_jobs` / :func:`log_failures`: at the end of a sweep, every failed (or never finished) job
  with its one-line error; ``python -m quantlab`` then exits 1.
* :func:`single_job_argv`: ``python -m quantlab quantizer=gptq`` is one run (``results/runs/...``), not a
  one-job sweep, although the primary config and the comparison presets default to MULTIRUN.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantlab.tracking.record import RESULT_FILE, RunRecord, read_record, utc_now_iso, write_record
from quantlab.tracking.runset import read_json, with_variant

logger = logging.getLogger(__name__)

_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def find_existing(root: Path, experiment: str, variant_id: str, seed: int, exclude: Path | None = None) -> Path | None:
    """The run dir of the newest ``ok`` record under ``root`` with this experiment, variant id and seed."""
    best: tuple[str, Path] | None = None
    for path in Path(root).rglob(RESULT_FILE):
        if exclude is not None and path.parent.resolve() == exclude.resolve():
            continue
        d = read_json(path)
        if not isinstance(d, dict) or d.get("status") != "ok" or d.get("experiment") != experiment or d.get("seed") != seed:
            continue
        vid = (d.get("variant") or {}).get("id")
        if vid is None:  # written before variants existed: recompute from its config
            try:
                vid = (with_variant(read_record(path)).variant or {}).get("id")
            except Exception:  # noqa: BLE001 (an unreadable old record never counts as a match)
                vid = None
        if vid == variant_id:
            stamp = str(d.get("finished_at") or d.get("started_at") or "")
            if best is None or stamp > best[0]:
                best = (stamp, path.parent)
    return best[1] if best else None


def record_skip(output_dir: Path, experiment: str, seed: int, variant: dict[str, Any], existing: Path,
                overrides: Sequence[str]) -> RunRecord:
    """Write the ``skipped`` record of a sweep job whose run already exists at ``existing``."""
    now = utc_now_iso()
    record = RunRecord(run_id=f"skipped-{output_dir.name}", status="skipped", experiment=experiment,
                       output_dir=str(output_dir), started_at=now, finished_at=now, wall_s=0.0, seed=seed,
                       variant=variant, overrides=list(overrides),
                       error={"type": "Skipped", "existing": str(existing),
                              "message": f"variant {variant['id']} seed {seed} already has an ok record: {existing}"})
    write_record(record, output_dir)
    return record


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(job dir, one-line error)`` of every job of a sweep that failed or has no record."""
    from quantlab.tracking.runset import collect

    out = []
    for r in collect(Path(sweep_dir)):
        if r.status in ("failed", "incomplete"):
            msg = str((r.error or {}).get("message") or r.status).strip().splitlines()
            out.append((r.output_dir, f"{(r.error or {}).get('type', r.status)}: {msg[0] if msg else r.status}"))
    return out


def log_failures(sweep_dir: Path) -> list[tuple[str, str]]:
    """Log one summary of the sweep's failed jobs (nothing when all succeeded); return them."""
    failures = failed_jobs(sweep_dir)
    if failures:
        lines = "\n".join(f"  {d}: {e}" for d, e in failures)
        logger.error("%d job(s) of the sweep %s failed:\n%s", len(failures), sweep_dir, lines)
    return failures


# ----------------------------------------------------------------------------- single job or sweep


def single_job_argv(argv: Sequence[str], config_dir: str, config_name: str = "config") -> bool:
    """True when ``argv`` (command-line overrides, no ``-m``) runs exactly one job although the composed
    config asks for MULTIRUN: every key the sweeper would sweep is given one value on the command line.
    False with any flag, an explicit ``hydra.mode``, or a launcher other than Hydra's local one (a
    cluster launcher submits even one job as a sweep)."""
    if any(a.startswith("-") for a in argv):  # -m, --cfg, -cn, ...: Hydra decides as usual
        return False
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        given = parser.parse_overrides(list(argv))
        if any(o.is_sweep_override() for o in given):
            return False
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=list(argv), return_hydra_config=True)
    except Exception:  # noqa: BLE001 (a bad override: let Hydra report it the usual way)
        return False
    finally:
        GlobalHydra.instance().clear()
    if str(cfg.hydra.mode) not in ("MULTIRUN", "RunMode.MULTIRUN"):
        return False
    keys = {o.key_or_group for o in given}
    if "hydra.mode" in keys or cfg.hydra.launcher.get("_target_") != _BASIC_LAUNCHER:
        return False  # asked for explicitly, or a cluster launcher: a one-job sweep is how it submits
    params = cfg.hydra.sweeper.get("params") or {}
    for key, value in params.items():
        if key in keys:
            continue
        if parser.parse_override(f"{key}={value}").is_sweep_override():
            return False
    return True
