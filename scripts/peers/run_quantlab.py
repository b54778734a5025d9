"""The quantlab arm of the peer benchmark: the same CLI, model, token file, measurement and output as
the peer runners (run_*.py), in quantlab's own venv.

  python scripts/peers/run_quantlab.py --model DIR --tokens calib.npy --method gptq|awq \
      --group-size 64 --out OUT [--settings '{"act_order": true}'] [--threads N]

``--settings`` are quantlab config fields of the method (the driver, scripts/bench_peers.py, passes
the ones that match the peer's algorithm); the calibration ids are used exactly as stored
(``calib.source=tokens``).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import _common  # noqa: E402
import _measure  # noqa: E402

log = logging.getLogger("quantlab.peers.quantlab")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings: dict = {}
    if "--settings" in argv:  # our own flag, before the shared parser sees the rest
        i = argv.index("--settings")
        settings = json.loads(argv[i + 1])
        del argv[i:i + 2]
    args = _common.parse_args(("gptq", "awq"), argv)
    ids = _common.setup(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantlab.quantizers  # noqa: F401  (registers every method)
    from quantlab.calib.datasets import CalibConfig, build_calib
    from quantlab.formats.spec import QuantFormat
    from quantlab.quantizers.base import QUANTIZERS
    from quantlab.types import RunContext

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model.eval()
    _measure.materialize(model)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    calib = build_calib(CalibConfig(source="tokens", path=str(args.tokens), n_samples=-1, seqlen=ids.shape[1]), tok)
    if not torch.equal(calib.tokens, ids):
        raise RuntimeError("quantlab's calibration ids differ from the token file")
    cls = QUANTIZERS.get(args.method)
    # AWQ's convention for both methods' reference point: asymmetric min/max over the group; GPTQ keeps
    # its reference range (widened to include 0), which is compressed-tensors' min/max convention too
    fmt = QuantFormat(bits=4, group_size=args.group_size, zero_in_range=(args.method == "gptq"))
    cfg = cls.config_cls(format=fmt, **settings)
    quantizer = cls(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=args.out, tokenizer=tok, calib=calib)
    rss_after_load = (_measure.trim_memory(), _measure.current_rss())[1]
    with _measure.RssSampler() as sampler:
        result = quantizer.quantize(model, calib, ctx)
    model = result.model
    full = cfg.to_dict()  # every field, defaults included
    summary = {k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, bool))}
    _common.finish(args, ids, sampler, rss_after_load, lambda: model.state_dict(), full, "quantlab",
                   extra={"summary": summary, "explicit_settings": settings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
