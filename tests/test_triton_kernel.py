"""kernels/w4a16_triton.py (W4A16 / W8A16 dequant-GEMM) against an independent float64 reference.

The CPU tests run the kernel in triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton is
first imported in the process (triton builds its own ``@jit`` helpers such as ``tl.zeros`` at import) and
while the kernel file is loaded and run: it is set around the module-level import below and again for this
module's tests (a module-scoped fixture), and is otherwise left as it was. For the same reason the test
marked ``gpu`` runs the compiled kernel in a subprocess without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

with pytest.MonkeyPatch.context() as _mp:
    _mp.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
if type(triton.language.zeros).__name__ != "InterpretedFunction":  # imported earlier without the interpreter
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file in its own process",
                allow_module_level=True)

KERNEL = Path(__file__).resolve().parents[1] / "kernels" / "w4a16_triton.py"
N, K = 40, 128  # N is not a multiple of the kernel's BLOCK_N (64); small: the interpreter is slow

# Measured max relative error max|y - ref| / max|ref| over every case below (seed 0, interpreter, CPU):
#   float32  ~5e-7 (fp32 tiles, fp32 accumulation, ieee dot)        -> assert < 1e-5
#   float16  ~6e-4 (the dequantized tile and y rounded to fp16)     -> assert < 3e-3
#   bfloat16 ~1.1e-2: the tile and y go to bf16, and the interpreter truncates fp32 -> bf16 casts (a GPU
#            rounds to nearest, about half the error)               -> assert < 3e-2
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, KERNEL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def kmod() -> ModuleType:
    """The kernel module, loaded with ``TRITON_INTERPRET=1`` (restored when the module's tests end)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield _load("quantlab_test_w4a16_triton_interp")


# --- independent reference: pack / unpack with plain shifts, dequantize and matmul in float64 ---------------


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> int32 words [N, K * bits // 32], code ``per*j + i`` at bit ``i * bits``."""
    per = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0], -1, per)
    words = torch.zeros(q.shape[:2], dtype=torch.int64)
    for i in range(per):
        words |= q[..., i] << (i * bits)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words -> unsigned codes [N, K] (int64)."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = [(words >> (i * bits)) & (2**bits - 1) for i in range(32 // bits)]
    return torch.stack(codes, dim=-1).reshape(qweight.shape[0], -1)


def reference(x, qweight, scales, zeros, group_size, bits, bias=None) -> torch.Tensor:
    """float64 ``x @ dequant(W)^T (+ bias)``."""
    q = unpack(qweight, bits).double()
    s = scales.double().repeat_interleave(group_size, dim=1)
    z = (torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float64) if zeros is None else zeros.double())
    w = (q - z.repeat_interleave(group_size, dim=1)) * s
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


def make(bits: int, group_size: int, asym: bool, dtype: torch.dtype, n: int = N, k: int = K, seed: int = 0):
    """Seeded (codes, qweight, scales, zeros) with scales in x's dtype and zeros float32 (or None)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = ((torch.rand(n, k // group_size, generator=g) + 0.5) / 2**bits).to(dtype)
    zeros = torch.randint(0, 2**bits, (n, k // group_size), generator=g).float() if asym else None
    return q, pack(q, bits), scales, zeros


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_reference_pack_roundtrip_and_nibble_order():
    q = torch.arange(16).repeat(2, 2)  # [2, 32]
    assert torch.equal(unpack(pack(q, 4), 4), q)
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4).item() == (0xF7654321 - 2**32)  # LSB first
    q8 = torch.randint(0, 256, (3, 16))
    assert torch.equal(unpack(pack(q8, 8), 8), q8)


def test_available(kmod):
    assert kmod.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("group_size", [32, 64, K], ids=["g32", "g64", "per_channel"])
@pytest.mark.parametrize("bits, asym", [(4, False), (4, True), (8, False), (8, True)],
                         ids=["w4sym", "w4asym", "w8sym", "w8asym"])
def test_matches_reference(kmod, bits, asym, group_size, m, dtype):
    _, qweight, scales, zeros = make(bits, group_size, asym, dtype, seed=bits + m + group_size)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = kmod.w4a16_matmul(x, qweight, scales, zeros, group_size, bits=bits)
    assert y.shape == (m, N) and y.dtype == dtype
    assert rel_err(y, reference(x, qweight, scales, zeros, group_size, bits)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 17])
def test_fp16_matches_reference(kmod, m):
    _, qweight, scales, zeros = make(4, 32, True, torch.float16)
    x = torch.randn(m, K).half()
    y = kmod.w4a16_matmul(x, qweight, scales, zeros, 32)
    assert y.dtype == torch.float16
    assert rel_err(y, reference(x, qweight, scales, zeros, 32, 4)) < TOL[torch.float16]


@pytest.mark.parametrize("m", [2, 20])
def test_small_group_gathers_scales_per_element(kmod, m):
    """group_size 8 (no power of two >= 16 divides it): the per-element scale path with a masked K tail."""
    _, qweight, scales, zeros = make(4, 8, True, torch.float32, k=72)
    x = torch.randn(m, 72)
    y = kmod.w4a16_matmul(x, qweight, scales, zeros, 8)
    assert rel_err(y, reference(x, qweight, scales, zeros, 8, 4)) < TOL[torch.float32]


def test_leading_dims_bias_and_strided_x(kmod):
    _, qweight, scales, zeros = make(4, 64, True, torch.float32)
    bias = torch.randn(N)
    x = torch.randn(2, 3, K)
    y = kmod.w4a16_matmul(x, qweight, scales, zeros, 64, bias=bias)
    assert y.shape == (2, 3, N)
    ref = reference(x.reshape(-1, K), qweight, scales, zeros, 64, 4, bias).reshape(2, 3, N)
    assert rel_err(y, ref) < TOL[torch.float32]
    xt = torch.randn(K, 19).T  # non-contiguous rows
    y = kmod.w4a16_matmul(xt, qweight, scales, zeros, 64, bias=bias)
    assert rel_err(y, reference(xt, qweight, scales, zeros, 64, 4, bias)) < TOL[torch.float32]


def test_mixed_scale_dtype(kmod):
    """bf16 scales and float16 zeros with float32 x: everything is dequantized in float32."""
    _, qweight, scales, zeros = make(8, 32, True, torch.bfloat16)
    x = torch.randn(5, K)
    y = kmod.w4a16_matmul(x, qweight, scales, zeros.half(), 32, bits=8)
    assert y.dtype == torch.float32
    assert rel_err(y, reference(x, qweight, scales, zeros, 32, 8)) < TOL[torch.float32]


def test_bad_shapes_raise(kmod):
    _, qweight, scales, zeros = make(4, 32, True, torch.float32)
    x = torch.randn(2, K)
    f = kmod.w4a16_matmul
    with pytest.raises(ValueError, match="group_size"):
        f(x, qweight, scales, zeros, 48)  # K % group_size != 0
    with pytest.raises(ValueError, match="multiple of 8"):
        f(torch.randn(2, 36), torch.zeros(N, 4, dtype=torch.int32), torch.ones(N, 1), None, 36)
    with pytest.raises(ValueError, match="qweight"):
        f(torch.randn(2, 64), qweight, scales, zeros, 32)  # qweight for K=128, x has K=64
    with pytest.raises(ValueError, match="qweight"):
        f(x, qweight.to(torch.int64), scales, zeros, 32)
    with pytest.raises(ValueError, match="scales"):
        f(x, qweight, scales[:, :2], zeros, 32)
    with pytest.raises(ValueError, match="zeros"):
        f(x, qweight, scales, zeros[:, :2], 32)
    with pytest.raises(ValueError, match="bits"):
        f(x, qweight, scales, zeros, 32, bits=3)
    with pytest.raises(ValueError, match="bias"):
        f(x, qweight, scales, zeros, 32, bias=torch.zeros(N + 1))
    with pytest.raises(ValueError, match="one device"):
        f(x.to("meta"), qweight, scales, zeros, 32)


_CUDA_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("w4a16_triton_cuda", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
cases = torch.load(sys.argv[2])
dev = torch.device("cuda")
out = []
for c in cases:
    args = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    out.append(mod.w4a16_matmul(**args).cpu())
torch.save(out, sys.argv[3])
"""


@pytest.mark.gpu
def test_cuda_fp16_matches_reference(tmp_path):
    """The compiled kernel on CUDA (fp16 tensor-core dot and the M <= 8 path), in a clean subprocess."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, k = 200, 512
    cases = []
    for m in (1, 7, 33, 200):
        for bits, asym, group_size in [(4, False, 128), (4, True, 64), (8, True, k)]:
            _, qweight, scales, zeros = make(bits, group_size, asym, torch.float16, n=n, k=k, seed=m)
            cases.append({"x": torch.randn(m, k).half(), "qweight": qweight, "scales": scales, "zeros": zeros,
                          "group_size": group_size, "bits": bits, "bias": torch.randn(n).half()})
    torch.save(cases, tmp_path / "cases.pt")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT, str(KERNEL), str(tmp_path / "cases.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for c, y in zip(cases, torch.load(tmp_path / "out.pt"), strict=True):
        assert y.dtype == torch.float16 and y.shape == (c["x"].shape[0], n)
        ref = reference(c["x"], c["qweight"], c["scales"], c["zeros"], c["group_size"], c["bits"], c["bias"])
        assert rel_err(y, ref) < TOL[torch.float16], (c["x"].shape[0], c["bits"], c["group_size"])


@pytest.mark.parametrize("act_order,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_packed_linear_triton_backend_matches_reference(act_order, dtype):
    """quantlab.nn.packed's ``triton`` backend (the kernel through the module, act_order columns permuted
    once) against its ``reference`` backend."""
    from quantlab.formats.codes import QuantizedWeight
    from quantlab.nn.packed import PackedLinear

    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (N, K), generator=gen).to(torch.uint8)
    scales = torch.rand(N, K // 32, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 16, scales.shape, generator=gen).float()
    g_idx = torch.randperm(K, generator=gen) // 32 if act_order else None
    qw = QuantizedWeight(codes, scales, zeros, 4, 32, False, g_idx)
    bias = torch.randn(N, generator=gen)
    x = torch.randn(3, K, generator=gen).to(dtype)
    ref = PackedLinear(qw, bias, torch.float32, "reference")(x).double()
    got = PackedLinear(qw, bias, torch.float32, "triton")(x)
    assert got.dtype == dtype and got.shape == (3, N)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < TOL[dtype]
