"""Smoothing math shared by SmoothQuant, SmoothQuant+ and AWQ (eq. 5/6); the methods are tested in
test_smoothquant.py, test_smoothquant_plus.py and test_awq.py."""
from __future__ import annotations

import pytest
import torch
from conftest import random_calib as _calib

from quantlab.algorithms.smoothing import fold_group_scales, group_scales, smoothquant_scales
from quantlab.calib.stats import collect_group_absmax, group_key
from quantlab.formats.spec import QuantFormat
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.nn.qat import sym_minmax_fake_quant

CPU = torch.device("cpu")
FMT = QuantFormat(bits=4, group_size=32)


def _x():
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def _mse(model, ref, x):
    with torch.no_grad():
        return ((model(x).logits - ref) ** 2).mean().item()


@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smoothing_alone_leaves_logits_unchanged(kv_heads, alpha):
    """Eq. 5 is an identity of the fp model: every group incl. up->down and (without GQA) v->o."""
    model, _ = build_tiny_llama(dtype=torch.float64, num_key_value_heads=kv_heads)
    mapping = get_mapping(model)
    x = _x()
    with torch.no_grad():
        ref = model(x).logits
    stats = collect_group_absmax(model, mapping, _calib().tokens, device=CPU)
    n_groups = 0
    for i, block in enumerate(mapping.blocks(model)):
        groups = mapping.applicable_groups(block)
        n_groups += len(groups)
        act = {g.key: stats[group_key(f"model.layers.{i}", g)] for g in groups}
        fold_group_scales(block, groups, group_scales(block, groups, act, alpha))
    assert n_groups == (8 if kv_heads == 4 else 6)
    with torch.no_grad():
        diff = (model(x).logits - ref).abs().max().item()
    assert diff <= 1e-6  # measured <= 3e-13 in float64
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, build_tiny_llama()[0].model.layers[0].input_layernorm.weight.double())


def test_eq6_scales():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothquant_scales(act, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert s[2] > 0  # floored, never zero
    with pytest.raises(ValueError):
        smoothquant_scales(act, w, 1.5)


def test_activation_quantizer_grid():
    x = torch.tensor([[1.0, -3.0, 0.0, 127.0]])
    assert torch.equal(sym_minmax_fake_quant(x, 8, -1, "smoothquant"), x)  # on the grid: s = 1
    y = sym_minmax_fake_quant(torch.randn(4, 16), 8, None, "smoothquant")  # per tensor
    assert len(torch.unique((y / (y.abs().max() / 127)).round())) <= 255
