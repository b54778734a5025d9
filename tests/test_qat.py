"""LLM-QAT fake quantization (issue 6, first part): W-A-KV settings, Eq. (3), STE, QAT Linears."""
from __future__ import annotations

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.formats.wakv import PAPER_SETTINGS, WAKV
from quantlab.models.mappings import get_mapping
from quantlab.nn.qat import (
    QATLinear,
    QATSpec,
    kv_linear_names,
    statsq_fake_quant,
    ste_fake_quant,
    swap_qat,
    swap_wakv,
    sym_minmax_fake_quant,
)

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
    kv = kv_linear_names(model)
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


def test_statsq_clips_weights_at_k_mean_abs_and_blocks_their_gradient():
    torch.manual_seed(0)
    w = (torch.randn(6, 64) * torch.linspace(0.5, 3, 64)).requires_grad_()
    q = statsq_fake_quant(w, 4, k=2.0)
    c = 2.0 * w.detach().abs().mean(-1, keepdim=True)
    assert (q.detach().abs() <= c * (1 + 1e-6)).all()  # clipped at the statistic
    levels = q.detach() / (c / 7)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # on the 15-level grid
    q.sum().backward()
    assert torch.equal(w.grad, (w.detach().abs() <= c).float())  # straight through inside, zero outside
    assert (w.grad == 0).any() and (w.grad == 1).any()


def test_lsq_step_is_initialised_from_the_data_and_learns():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    q = QATLinear.from_linear(lin, QATSpec(w_bits=4, a_bits=4, a_quant="lsq"))
    x = torch.randn(3, 5, 16)
    assert not bool(q.act_step_ready)
    y = q(x)
    want = 2 * x.abs().mean() / 7 ** 0.5  # LSQ's init 2 <|x|> / sqrt(Q_P)
    torch.testing.assert_close(q.act_step.detach(), want)
    assert bool(q.act_step_ready) and "act_step" in dict(q.named_parameters())
    y.pow(2).sum().backward()
    assert q.act_step.grad is not None and torch.isfinite(q.act_step.grad) and q.act_step.grad != 0
    # the forward is the LSQ grid: x / s clipped to [-8, 7] and rounded
    s = q.act_step.detach()
    xq = torch.clamp(x / s, -8, 7).round() * s
    ref = torch.nn.functional.linear(xq, sym_minmax_fake_quant(lin.weight.detach(), 4), lin.bias.detach())
    torch.testing.assert_close(y.detach(), ref, rtol=0, atol=1e-5)


def test_swap_wakv_for_ptq_adds_activation_and_kv_quant_only(tiny):
    model, _ = tiny
    names = sorted(get_mapping(model).block_linears(model))
    kv = kv_linear_names(model)
    w_before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    done = swap_wakv(model, [n for n in names if "k_proj" not in n], kv, 16, 8, 4)
    assert done == names  # excluded k_proj still gets its KV quantization
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert (k.spec.w_bits, k.spec.a_bits, k.spec.out_bits) == (16, 16, 4)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert (q.spec.w_bits, q.spec.a_bits, q.spec.out_bits) == (16, 8, 16)
    assert all(torch.equal(model.get_submodule(n).quantized_weight(), w_before[n]) for n in names)
    with pytest.raises(TypeError, match="already swapped"):
        swap_wakv(model, names, kv, 16, 8, 4)
