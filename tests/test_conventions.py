"""Each method keeps its own zero convention and symmetric grid unless a format sets one, and a run that departs
from its method's own shows it in the label (audit A6, A7)."""
from __future__ import annotations

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir

from quantlab.cli import build_spec
from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat
from quantlab.quantizers.base import build_quantizer


def _gptq_find_params_sym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's ``Quantizer.find_params`` (quant.py, ``sym=True``, per row), transcribed independently."""
    maxq = torch.tensor(2**bits - 1, dtype=x.dtype)
    tmp = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    xmax = torch.maximum(torch.abs(xmin), xmax)
    tmp = xmin < 0
    if torch.any(tmp):
        xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2)
    return scale, zero


def _gptq_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_full_symmetric_grid_is_gptq_sym_line_for_line(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 64, generator=g)
    w[1] = w[1].abs()          # no negative weight: GPTQ keeps xmin = 0 (its top half clips)
    w[2] = 0.0                 # all-zero row: [-1, 1]
    w[3] = -w[3].abs()         # no positive weight
    fmt = QuantFormat(bits=bits, group_size=-1, symmetric=True, symmetric_grid="full")
    scale, zero = affine.choose_qparams(w, fmt)
    ref_s, ref_z = _gptq_find_params_sym(w.clone(), bits)
    torch.testing.assert_close(scale.squeeze(-1), ref_s, rtol=0, atol=0)
    torch.testing.assert_close(zero.squeeze(-1), ref_z, rtol=0, atol=0)
    ours = affine.fake_quantize(w, fmt)
    ref = _gptq_quantize(w, ref_s[:, None], ref_z[:, None], 2**bits - 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # the documented quirk: an all-positive row keeps only 2^(b-1) - 1 levels above zero
    assert ours[1].max() <= (2 ** (bits - 1) - 1) / (2**bits - 1) * w[1].max() + 1e-6


def test_restricted_grid_is_llmqat_eq3():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    scale, zero = affine.choose_qparams(w, QuantFormat(bits=4, group_size=-1, symmetric=True))
    torch.testing.assert_close(scale.squeeze(-1), w.abs().amax(dim=1) / 7)
    assert torch.all(zero == 8)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _quantizer(overrides: list[str]):
    return build_quantizer(build_spec(_compose(overrides)).quantizer)


@pytest.mark.parametrize("overrides, zero_in_range, label", [
    (["+exp=sqplus_smollm2", "quantizer=gptq"], True, "gptq w4g64a"),       # GPTQ's own, in a mixed sweep
    (["+exp=sqplus_smollm2", "quantizer=awq"], False, "awq w4g64a"),
    (["+exp=sqplus_smollm2", "quantizer=smoothquant_plus"], False, "smoothquant_plus w4g64a"),
    (["quantizer=rtn"], False, "rtn w4g64a"),
    (["+exp=smoothquant_plus_34b", "quantizer=gptq"], True, "gptq w4g128a"),
    # a format value set on purpose is honoured, and the label says so
    (["quantizer=gptq", "quantizer.format.zero_in_range=false"], False, "gptq w4g64a:awq-zero"),
    (["quantizer=rtn", "quantizer.format.zero_in_range=true"], True, "rtn w4g64a:gptq-zero"),
])
def test_each_method_keeps_its_zero_convention(overrides, zero_in_range, label):
    q = _quantizer(overrides)
    assert q.config.format.zero_in_range is zero_in_range
    assert q.label("float32") == label


@pytest.mark.parametrize("method, grid, label", [
    ("gptq", "full", "gptq w4pcs 4-8-4"),       # the GPTQ rows of the LLM-QAT tables: GPTQ's own --sym grid
    ("rtn", "restricted", "rtn w4pcs 4-8-4"),   # RTN: LLM-QAT's Eq. 3 grid
])
def test_llmqat_preset_grids(method, grid, label):
    q = _quantizer(["+exp=llmqat_smollm2", f"quantizer={method}"])
    assert q.config.format.symmetric and q.config.format.symmetric_grid == grid
    assert q.label("float32") == label


def test_a_grid_other_than_the_methods_own_shows_in_the_label():
    q = _quantizer(["+exp=llmqat_smollm2", "quantizer=gptq", "quantizer.format.symmetric_grid=restricted"])
    assert q.label("float32") == "gptq w4pcs:llmqat-grid 4-8-4"
    q = _quantizer(["+exp=llmqat_smollm2", "quantizer=rtn", "quantizer.format.symmetric_grid=full"])
    assert q.label("float32") == "rtn w4pcs:gptq-grid 4-8-4"


def test_bad_convention_values_are_one_clear_error():
    from quantlab.errors import ConfigError

    with pytest.raises(ConfigError, match="quantizer.format.symmetric_grid"):
        QuantFormat(symmetric=True, symmetric_grid="wide")
    with pytest.raises(ConfigError, match="quantizer.format.zero_in_range"):
        QuantFormat(zero_in_range="yes")
