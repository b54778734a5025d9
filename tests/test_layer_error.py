"""LayerErrorEval on the tiny model: values checked against independent computations, bit-width
ordering, the exact identity case, and hook hygiene (also when the forward raises)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate

from quantlab.errors import ConfigError, QuantlabError
from quantlab.evals.layer_error import LayerErrorEval, OutputErrorAccumulator, relative_weight_error, sqnr_db
from quantlab.formats.spec import QuantFormat
from quantlab.models.tiny import build_tiny_llama
from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
from quantlab.types import CalibData, RunContext, tokens_sha256

CONF = Path(__file__).resolve().parents[1] / "conf"
METRICS = {"layer/mean_rel_weight_error", "layer/mean_output_sqnr_db", "layer/min_output_sqnr_db"}


def _calib(n: int = 4, seqlen: int = 32, vocab: int = 256, seed: int = 0) -> CalibData:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seqlen), generator=g, dtype=torch.int64)
    sha = tokens_sha256(tokens)
    return CalibData(tokens=tokens, name="random", n_samples=n, seqlen=seqlen, seed=seed, sha256=sha)


def _setup(bits: int | None = 4, dtype: torch.dtype = torch.float32, calib: CalibData | None = None):
    """Tiny model, fp snapshot of its decoder Linears, RTN (g32 asym) applied unless ``bits`` is None."""
    model, tok = build_tiny_llama(dtype=dtype)
    q = RTNQuantizer(RTNConfig(format=QuantFormat(bits=bits or 4, group_size=32)))
    fp = {name: mod.weight.detach().clone().cpu() for name, mod in q.target_linears(model)}
    ctx = RunContext(device=torch.device("cpu"), seed=0, output_dir=Path("."), calib=calib or _calib())
    ctx.fp_weights = fp
    if bits is not None:
        q.quantize(model, ctx.calib, ctx)
    return model, tok, ctx


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- pure functions


def test_pure_functions_hand_values():
    assert relative_weight_error(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]])) == 4.0 / 5.0
    assert relative_weight_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
    assert relative_weight_error(torch.zeros(2, 2), torch.ones(2, 2)) == math.inf
    with pytest.raises(ValueError):
        relative_weight_error(torch.zeros(2, 3), torch.zeros(3, 2))
    assert sqnr_db(100.0, 1.0) == 20.0
    assert sqnr_db(5.0, 0.0) == math.inf and sqnr_db(0.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    with pytest.raises(ValueError):
        sqnr_db(-1.0, 1.0)
    acc = OutputErrorAccumulator()
    assert math.isnan(acc.mse)
    acc.update(torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 3.0]]))  # signal 25, output 18, noise 1
    acc.update(torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, 5.0]]))  # signal 25, output 25, noise 0
    assert (acc.signal, acc.output, acc.noise, acc.n_elements) == (50.0, 43.0, 1.0, 4)
    assert acc.mse == 0.25 and acc.sqnr_db == 10 * math.log10(50.0)


def test_config_validation_and_yaml():
    for bad in (dict(max_samples=0), dict(max_samples=True), dict(batch_size=0), dict(batch_size=2.0)):
        with pytest.raises(ConfigError, match=r"eval\.layer_error\."):
            LayerErrorEval(**bad)
    assert LayerErrorEval.requires_calibration and LayerErrorEval.requires_fp_weights
    raw = yaml.safe_load((CONF / "eval" / "layer_error.yaml").read_text())
    assert list(raw) == ["layer_error"]
    ev = instantiate(raw["layer_error"])
    assert isinstance(ev, LayerErrorEval) and ev.name == "layer_error" and ev.max_samples == 8
    assert ev.kind == "layer_error"


# --------------------------------------------------------------------------- values


def test_rel_weight_error_matches_independent_computation():
    model, tok, ctx = _setup(bits=4)
    res = LayerErrorEval(max_samples=2).run(model, tok, ctx)
    rows = res.tables["layer_diagnostics"]
    names = [r["layer"] for r in rows]
    assert names == [n for n, _ in model.named_modules() if n in ctx.fp_weights] and len(names) == 14
    for r in rows:
        a = ctx.fp_weights[r["layer"]].numpy().astype(np.float64)
        b = model.get_submodule(r["layer"]).weight.detach().numpy().astype(np.float64)
        assert (r["out_features"], r["in_features"]) == a.shape
        assert r["rel_weight_error"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-12)
    mean = sum(r["rel_weight_error"] for r in rows) / len(rows)
    assert res.metrics["layer/mean_rel_weight_error"] == pytest.approx(mean, rel=1e-15)
    assert 0.0 < mean < 0.15  # measured 0.081 (w4 g32 asym)


def test_output_sqnr_matches_independent_computation():
    # float64 model: the evaluator computes in float64, so an independent float64 pass agrees tightly
    model, tok, ctx = _setup(bits=3, dtype=torch.float64, calib=_calib(n=3, seqlen=16))
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in ctx.fp_weights}
    def record(name: str):
        return lambda mod, args, y: captured[name].append((args[0].clone(), y.clone()))

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in ctx.fp_weights]
    try:
        with torch.no_grad():
            for i in range(3):
                model(input_ids=ctx.calib.tokens[i : i + 1])
    finally:
        for h in handles:
            h.remove()
    res = LayerErrorEval(max_samples=None).run(model, tok, ctx)
    rows = {r["layer"]: r for r in res.tables["layer_diagnostics"]}
    for name, pairs in captured.items():
        w = ctx.fp_weights[name]
        sig = sum(float((x @ w.T).square().sum()) for x, _ in pairs)
        noise = sum(float((x @ w.T - y).square().sum()) for x, y in pairs)
        n_el = sum(y.numel() for _, y in pairs)
        assert rows[name]["output_sqnr_db"] == pytest.approx(10 * math.log10(sig / noise), abs=1e-9)
        assert rows[name]["output_mse"] == pytest.approx(noise / n_el, rel=1e-9)


def test_sqnr_improves_with_bits():
    calib = _calib()
    means, mins = {}, {}
    for bits in (2, 4, 8):
        model, tok, ctx = _setup(bits=bits, calib=calib)
        m = LayerErrorEval().run(model, tok, ctx).metrics
        means[bits], mins[bits] = m["layer/mean_output_sqnr_db"], m["layer/min_output_sqnr_db"]
    # measured mean (min) dB, w{b} g32 asym: 2 -> 7.7 (6.3), 4 -> 21.7 (20.5), 8 -> 46.4 (45.2)
    assert means[8] > means[4] > means[2], means
    assert mins[8] > mins[4] > mins[2], mins
    assert means[4] > 18.0  # measured 21.7 dB
    assert means[8] - means[4] > 20.0  # ~6 dB per bit; measured 24.7 dB


def test_identity_weights_give_zero_noise():
    model, tok, ctx = _setup(bits=None)
    res = LayerErrorEval().run(model, tok, ctx)
    for r in res.tables["layer_diagnostics"]:
        assert r["rel_weight_error"] == 0.0 and r["output_mse"] == 0.0 and r["output_sqnr_db"] == math.inf, r
    assert res.metrics == {
        "layer/mean_rel_weight_error": 0.0,
        "layer/mean_output_sqnr_db": math.inf,
        "layer/min_output_sqnr_db": math.inf,
    }


@pytest.mark.parametrize("fp_weights", [None, {}])
def test_no_quantized_layers(fp_weights):
    model, tok, ctx = _setup(bits=None)
    ctx.fp_weights, ctx.calib = fp_weights, None  # no calib needed either
    res = LayerErrorEval().run(model, tok, ctx)
    assert res.metrics == {} and res.tables == {}
    assert "no quantized layers" in str(res.provenance)


def test_missing_calib_raises():
    model, tok, ctx = _setup(bits=4)
    ctx.calib = None
    with pytest.raises(QuantlabError, match="layer_error needs calibration data"):
        LayerErrorEval().run(model, tok, ctx)


def test_provenance_sample_limit_and_batching():
    model, tok, ctx = _setup(bits=4, dtype=torch.float64, calib=_calib(n=5, seqlen=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = LayerErrorEval(max_samples=4, batch_size=1).run(model, tok, ctx)
    assert set(res.metrics) == METRICS and all(isinstance(v, float) for v in res.metrics.values())
    rows = res.tables["layer_diagnostics"]
    worst = min(rows, key=lambda r: r["output_sqnr_db"])
    assert res.metrics["layer/min_output_sqnr_db"] == worst["output_sqnr_db"]
    for key in METRICS:
        p = res.provenance[key]
        assert p["calib"] == "random" and p["calib_sha256"] == ctx.calib.sha256
        assert (p["n_rows"], p["seqlen"]) == (4, 16)
        assert p["inputs"] == "quantized model activations (errors propagate)"
        assert p["worst_layer"] == worst["layer"]
    # the evaluator does not modify the model
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    # two rows per forward: same sums up to summation order (float64)
    batched = LayerErrorEval(max_samples=4, batch_size=2).run(model, tok, ctx)
    for k, v in res.metrics.items():
        assert batched.metrics[k] == pytest.approx(v, rel=1e-9)
    # max_samples beyond the calibration set uses every row; fewer rows change the numbers
    every = LayerErrorEval(max_samples=100).run(model, tok, ctx)
    assert every.provenance["layer/mean_output_sqnr_db"]["n_rows"] == 5
    assert every.metrics["layer/mean_output_sqnr_db"] != res.metrics["layer/mean_output_sqnr_db"]


# --------------------------------------------------------------------------- hooks


def test_hooks_removed_after_run():
    model, tok, ctx = _setup(bits=4)
    assert _n_hooks(model) == 0
    LayerErrorEval(max_samples=2).run(model, tok, ctx)
    assert _n_hooks(model) == 0


def test_hooks_removed_when_forward_raises():
    model, tok, ctx = _setup(bits=4)
    tokens = ctx.calib.tokens.clone()
    tokens[1, 5] = model.config.vocab_size  # out-of-vocabulary id in the second row: embedding raises
    n, seqlen = tokens.shape
    sha = tokens_sha256(tokens)
    ctx.calib = CalibData(tokens=tokens, name="bad", n_samples=n, seqlen=seqlen, seed=0, sha256=sha)
    # count the forward hooks present each time a forward starts (a pre-hook on the embedding)
    live: list[int] = []
    probe = model.get_submodule("model.embed_tokens").register_forward_pre_hook(
        lambda *a: live.append(sum(len(m._forward_hooks) for m in model.modules()))
    )
    with pytest.raises(IndexError):
        LayerErrorEval(max_samples=2).run(model, tok, ctx)
    probe.remove()
    assert live == [14, 14]  # row 0 ran with one hook per quantized Linear; row 1 raised
    assert _n_hooks(model) == 0
