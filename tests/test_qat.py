"""LLM-QAT fake quantization (issue 6, first part): W-A-KV settings, Eq. (3), STE, QAT Linears."""
from __future__ import annotations

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.formats.wakv import PAPER_SETTINGS, WAKV
from quantlab.models.mappings import get_mapping
from quantlab.nn.qat import QATLinear, QATSpec, ste_fake_quant, swap_qat, sym_minmax_fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wakv_parses_the_paper_settings_and_rejects_bad_ones():
    assert [str(WAKV.parse(s)) for s in PAPER_SETTINGS] == list(PAPER_SETTINGS)
    w = WAKV.parse("4-8-16")
    assert w.quantizes_weights and w.quantizes_acts and not w.quantizes_kv
    for bad in ("4-8", "4-x-4", "12-8-8", "4-1-4", "4-8-17"):
        with pytest.raises(ConfigError, match="quantizer.wakv"):
            WAKV.parse(bad)


def test_eq3_per_token_matches_a_hand_computation():
    x = torch.tensor([[0.45, -1.0, 0.26, 0.0], [3.0, 1.4, -0.2, 0.0]])  # no value on a rounding tie
    # 4 bits: qmax 7; row 0 alpha = 1/7, row 1 alpha = 3/7
    want = torch.stack([torch.round(x[0] * 7) / 7, torch.round(x[1] / (3 / 7)) * (3 / 7)])
    torch.testing.assert_close(sym_minmax_fake_quant(x, 4), want, rtol=0, atol=1e-7)
    assert torch.equal(sym_minmax_fake_quant(x, 16), x)
    assert torch.equal(sym_minmax_fake_quant(torch.zeros(2, 3), 4), torch.zeros(2, 3))
    # the reference code's epsilons change values by far less than a step
    assert (sym_minmax_fake_quant(x, 4, arith="code") - want).abs().max() < 1e-5


def test_ste_gradients_are_finite_nonzero_and_respect_the_code_clip():
    x = (torch.randn(4, 16) * 1.5).requires_grad_()
    r = torch.randn(4, 16)
    (ste_fake_quant(x, 4) * r).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).all()
    assert torch.equal(x.grad, r)  # round() has zero gradient; the STE passes it through unchanged
    x.grad = None
    ste_fake_quant(x, 4).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * sym_minmax_fake_quant(x.detach(), 4))  # chain rule through the STE
    x.grad = None
    ste_fake_quant(x, 4, ste_clip=2.0).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() < 2.0).float())  # the code's fixed [-2, 2] window


def test_qat_linear_equals_a_reference_fake_quant_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(2, 5, 32)
    q = QATLinear.from_linear(lin, QATSpec(w_bits=4, a_bits=8, out_bits=4))
    assert q.weight is lin.weight and q.bias is lin.bias  # shared Parameters, stock module type
    # reference written out here: per-output-channel weights, per-token inputs and outputs
    w_s = lin.weight.detach().abs().amax(1, keepdim=True) / 7
    w_q = torch.round(lin.weight.detach() / w_s) * w_s
    x_s = x.abs().amax(-1, keepdim=True) / 127
    y = torch.nn.functional.linear(torch.round(x / x_s) * x_s, w_q, lin.bias.detach())
    y_s = y.abs().amax(-1, keepdim=True) / 7
    torch.testing.assert_close(q(x), torch.round(y / y_s) * y_s, rtol=0, atol=1e-6)


def test_swap_on_the_tiny_model_quantizes_kv_outputs_and_trains(tiny):
    model, _ = tiny
    mapping = get_mapping(model)
    names = sorted(mapping.block_linears(model))
    kv = {f"{mapping.block_name(i)}.{r}" for i in range(len(mapping.blocks(model))) for r in mapping.kv}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    done = swap_qat(model, names, kv, w_bits=4, a_bits=8, kv_bits=4)
    assert len(done) == 14 and all(isinstance(model.get_submodule(n), QATLinear) for n in names)
    assert model.get_submodule("model.layers.0.self_attn.k_proj").spec.out_bits == 4
    assert model.get_submodule("model.layers.0.self_attn.q_proj").spec.out_bits == 16
    out = model(ids).logits
    assert not torch.allclose(out, ref) and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [model.get_submodule(n).weight.grad for n in names]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
