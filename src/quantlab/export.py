"""``python -m quantlab.export RUN_DIR OUT_DIR --format compressed-tensors|gptq|awq``: a finished run as a
checkpoint that vLLM and transformers load.

The run's quantized model is rebuilt from its own record: the model and method configs in
``config_resolved.json`` and, for calibrated methods, its ``artifacts.safetensors`` re-applied (bit for bit,
no calibration: GPTQ's saved codes; AWQ's scales and clips; SmoothQuant+'s smoothing factors); RTN is
recomputed (it is deterministic). The method's integer codes are then written in the chosen format
(:mod:`quantlab.deploy.export`). A run can also export while it runs: ``deploy.export=[...]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

from quantlab.deploy.config import DeployConfig, check_packable
from quantlab.deploy.export import FORMATS, write_checkpoint
from quantlab.errors import ConfigError, QuantlabError
from quantlab.quantizers.artifacts import ARTIFACTS_FILE

log = logging.getLogger("quantlab.export")


def _read(run_dir: Path, name: str) -> dict:
    path = run_dir / name
    if not path.is_file():
        raise ConfigError("export.run_dir", f"{path} not found: not a quantlab run directory")
    return json.loads(path.read_text())


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str, device: str = "cpu") -> Path:
    """Rebuild the quantized model of ``run_dir`` and write it as a ``fmt`` checkpoint into ``out_dir``."""
    from omegaconf import OmegaConf

    from quantlab.cli import build_spec
    from quantlab.models.loaders import load_model
    from quantlab.quantizers.base import build_quantizer
    from quantlab.types import RunContext

    run_dir = Path(run_dir).expanduser()
    if fmt not in FORMATS:
        raise ConfigError("export.format", f"must be one of {FORMATS}, got {fmt!r}")
    record = _read(run_dir, "result.json")
    if record.get("status") != "ok":
        raise ConfigError("export.run_dir", f"{run_dir} holds a {record.get('status')!r} run, not an ok one")
    spec = build_spec(OmegaConf.create(_read(run_dir, "config_resolved.json")))
    qcfg = spec.quantizer
    if hasattr(qcfg, "load_artifacts"):
        if not (run_dir / ARTIFACTS_FILE).is_file():
            raise ConfigError("export.run_dir", f"{run_dir / ARTIFACTS_FILE} not found: the run was made with "
                                                "save_artifacts=false, so its result cannot be rebuilt")
        qcfg = dataclasses.replace(qcfg, load_artifacts=str(run_dir))
    quantizer = build_quantizer(qcfg)
    check_packable(quantizer, "export.run_dir")
    loaded = load_model(dataclasses.replace(spec.model, device=device, device_map=None, offload=None))
    quantizer.validate(loaded.model)
    summary = record.get("quant_summary") or {}
    label = str(summary.get("method_label") or quantizer.label(spec.model.dtype))
    with tempfile.TemporaryDirectory(prefix="quantlab-export-") as tmp:
        ctx = RunContext(device=loaded.device, seed=spec.seed, output_dir=Path(tmp), tokenizer=loaded.tokenizer,
                         keep_codes=True, method_label=label)
        result = quantizer.quantize(loaded.model, None, ctx)  # no W-A-KV: check_packable refuses it
    if result.codes is None:
        raise RuntimeError(f"{quantizer.name} returned no codes")
    deploy = summary.get("deploy") or {}
    if deploy.get("pack"):  # the exported model is the method's, whatever backend the run evaluated it with
        label = label.removesuffix(DeployConfig(pack=True, backend=deploy["backend"]).label())
    meta = {"method_label": label, "run_dir": str(run_dir), "run_id": record.get("run_id"),
            "variant": (record.get("variant") or {}).get("id"), "format_spec": record.get("format"),
            "quantizer": quantizer.name, "model": spec.model.name}
    return write_checkpoint(loaded.model, loaded.tokenizer, result.codes, Path(out_dir).expanduser(), fmt, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantlab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run's directory (holds result.json)")
    parser.add_argument("out_dir", help="where to write the checkpoint (must not exist)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--device", default="cpu", help="device to rebuild the model on (default cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        out = export_run(args.run_dir, args.out_dir, args.format, args.device)
    except QuantlabError as e:
        log.error("error: %s", e)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
