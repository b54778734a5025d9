"""CUDA paths (marked gpu: skipped without a CUDA device) — same results as on CPU."""
from __future__ import annotations

import pytest
import torch

from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.rtn import RTNConfig, RTNQuantizer
from quantlab.types import RunContext


@pytest.mark.gpu
def test_rtn_on_cuda_matches_cpu(tiny, tmp_path):
    model, _ = tiny
    fmt = QuantFormat(bits=4, group_size=32)
    ref = {n: affine.fake_quantize(m.weight.data, fmt) for n, m in model.named_modules() if n.endswith("proj")}
    model = model.to("cuda")
    ctx = RunContext(device=torch.device("cuda"), seed=0, output_dir=tmp_path)
    res = RTNQuantizer(RTNConfig(format=fmt)).quantize(model, None, ctx)
    assert set(res.quantized_layers) == set(ref)
    for name in res.quantized_layers:
        got = model.get_submodule(name).weight.data.cpu()
        # elementwise min/max/round on CUDA: the same grid points as on CPU (division may differ by 1 ulp)
        torch.testing.assert_close(got, ref[name], rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_perplexity_on_cuda_matches_cpu(tiny, tmp_path):
    from quantlab.evals.perplexity import PerplexityEval

    model, tok = tiny
    ev = PerplexityEval(name="t", dataset="local", path="stdlib", seqlen=128, max_windows=4)
    cpu = ev.run(model, tok, RunContext(device=torch.device("cpu"), seed=0, output_dir=tmp_path)).metrics["ppl/t"]
    gpu = ev.run(model.to("cuda"), tok, RunContext(device=torch.device("cuda"), seed=0, output_dir=tmp_path))
    assert gpu.metrics["ppl/t"] == pytest.approx(cpu, rel=1e-4)
