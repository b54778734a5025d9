"""W4A16 / W8A16 dequant-GEMM in Triton: ``y = x @ dequant(W)^T (+ bias)``.

Weight layout (compressed-tensors "pack-quantized", the layout quantlab keeps in memory). ``W`` has ``N``
output rows and ``K`` input columns; ``G`` is the group size (``G == K`` for per-channel scales):

=========  ====================  ===================================================================
tensor     shape                 content
=========  ====================  ===================================================================
qweight    int32 [N, K*bits/32]  unsigned codes, LSB first: for bits=4 nibble ``i`` of word ``j`` in
                                 row ``n`` is ``q[n, 8j+i]`` in [0, 15]; for bits=8 byte ``i`` of word
                                 ``j`` is ``q[n, 4j+i]`` in [0, 255]
scales     [N, K/G]              float32, float16 or bfloat16
zeros      [N, K/G] or None      float tensor holding integers in [0, 2^bits - 1]; ``None`` means
                                 symmetric with zero point ``2^(bits-1)``
x          [..., K]              float32, float16 or bfloat16; the output has x's dtype and shape
                                 ``[..., N]``
=========  ====================  ===================================================================

Math: ``w[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]`` and ``y[m, n] = sum_k x[m, k] w[n, k] + b[n]``.
The codes are unpacked and dequantized in float32 inside the kernel, one ``[BLOCK_K, BLOCK_N]`` tile at a
time (the full-precision weight is never materialised in memory); the tile is cast to x's dtype and fed to
``tl.dot`` with a float32 accumulator (fp32 inputs use ``input_precision="ieee"``, so no TF32 rounding).
For small M (<= 8 rows, decode/GEMV) a broadcast-multiply-and-sum path replaces ``tl.dot``, which needs
tiles of at least 16 rows. When a power of two >= 16 divides the group size, ``BLOCK_K`` is chosen to
divide it, so a K tile lies in one group and loads one scale (and zero) per column; otherwise the kernel
gathers the scale of every element and masks the K tail.

Testing: ``tests/test_triton_kernel.py`` runs the kernel under ``TRITON_INTERPRET=1`` on CPU (the default
suite) against an independent float64 reference (plain-torch unpacking with shifts), and one test marked
``gpu`` runs it on CUDA in float16. The block sizes are untuned heuristics: no GPU timing has been taken.

Interpreter mode: ``TRITON_INTERPRET=1`` must be set before triton is first imported in the process and
before this file is loaded (``@triton.jit`` reads it then); CPU tensors then work. Two quirks of triton
3.x's interpreter concern bfloat16 only: its ``tl.dot`` multiplies the raw bf16 bit patterns as integers, so
bf16 tiles are upcast to fp32 before the dot when interpreting (the same products, exact in fp32, and the
same fp32 accumulation); and it truncates fp32 -> bf16 casts where a GPU rounds to nearest, so bf16 results
on CPU carry about twice the GPU's rounding error.

This file is loaded by path (``importlib.util.spec_from_file_location``), so it imports only torch,
triton and the standard library.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAVE_TRITON = False

__all__ = ["available", "w4a16_matmul"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GEMV_MAX_M = 8  # at most this many rows: the non-dot (broadcast-and-sum) path

# ``@triton.jit`` picks the interpreter when it runs, i.e. when this file is loaded: read the mode once here.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available() -> bool:
    """True when triton imports and either a CUDA device is present or ``TRITON_INTERPRET=1`` was set when
    this file was loaded (the kernels then run in triton's CPU interpreter)."""
    return _HAVE_TRITON and (_INTERPRET or torch.cuda.is_available())


if _HAVE_TRITON:

    @triton.jit
    def _dequant_tile(
        qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_k, mask_n,
        stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
        G: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    ):
        """The float32 tile ``w^T[offs_k, offs_n]`` (shape [BLOCK_K, BLOCK_N]); masked entries are 0."""
        PER_WORD: tl.constexpr = 32 // BITS
        MAXQ: tl.constexpr = (1 << BITS) - 1
        mask = mask_k[:, None] & mask_n[None, :]
        word_ptrs = qw_ptr + offs_n[None, :] * stride_qn + (offs_k // PER_WORD)[:, None] * stride_qk
        words = tl.load(word_ptrs, mask=mask, other=0)
        shifts = ((offs_k % PER_WORD) * BITS)[:, None]
        q = ((words >> shifts) & MAXQ).to(tl.float32)  # the mask drops arithmetic-shift sign bits
        if GROUP_ALIGNED:
            # the whole K tile (starting at k0) lies in one group: one scale (and zero) per column
            g = k0 // G
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
            else:
                z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
            w = (q - z[None, :]) * s[None, :]
        else:
            gk = (offs_k // G)[:, None]
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + gk * stride_sg, mask=mask, other=0.0)
            s = s.to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n[None, :] * stride_zn + gk * stride_zg, mask=mask, other=0.0)
                z = z.to(tl.float32)
            else:
                z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
            w = (q - z) * s
        return w

    @triton.jit
    def _wxa16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
        stride_ym, stride_yn,
        G: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
        GROUP_ALIGNED: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] tile of ``y = x @ dequant(W)^T (+ bias)``, float32 accumulation."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0,
            )
            w = _dequant_tile(
                qw_ptr, s_ptr, z_ptr, k0, offs_k, offs_n, mask_k, mask_n,
                stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
                G, BITS, HAS_ZEROS, GROUP_ALIGNED,
            )
            if USE_DOT:
                w = w.to(x.dtype)  # the dequantized tile in x's precision, as the GPU tensor cores take it
                if DOT_FP32:
                    # interpreter only: its tl.dot multiplies bf16 bit patterns as integers; the bf16 values
                    # upcast to fp32 give the same products (exact in fp32) and the same fp32 accumulation
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                # "ieee": exact fp32 products for fp32 x (no TF32); ignored for fp16/bf16 inputs
                acc = tl.dot(x, w, acc, input_precision="ieee", out_dtype=tl.float32)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += b[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
        )


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n``, at most ``cap``."""
    d = 1
    while d < cap and n % (2 * d) == 0:
        d *= 2
    return d


def _config(m: int, group_size: int) -> dict:
    """Block sizes and path flags for ``m`` rows (untuned heuristics; see the module docstring)."""
    use_dot = m > _GEMV_MAX_M
    if use_dot:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64
        cap = 64
    else:
        block_m = triton.next_power_of_2(m)
        block_n = 64
        cap = 128 // block_m if block_m > 1 else 128  # bounds the [BLOCK_M, BLOCK_K, BLOCK_N] product
    block_k = _pow2_divisor(group_size, cap)
    aligned = block_k >= 16
    if not aligned:
        block_k = 32  # any group size: per-element scales, masked K tail
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_ALIGNED": aligned,
            "USE_DOT": use_dot}


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           group_size: int, bits: int, bias: torch.Tensor | None) -> tuple[int, int]:
    """Validate the arguments; return ``(N, K)``."""
    if bits not in (4, 8):
        raise ValueError(f"w4a16_matmul: bits must be 4 or 8, got {bits}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w4a16_matmul: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("w4a16_matmul: x must have at least one dimension ([..., K])")
    per_word = 32 // bits
    k = x.shape[-1]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"w4a16_matmul: qweight must be a 2-D int32 tensor, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n = qweight.shape[0]
    if k % per_word != 0:
        raise ValueError(f"w4a16_matmul: K={k} must be a multiple of {per_word} (32 // bits) for bits={bits}")
    if qweight.shape[1] != k // per_word:
        raise ValueError(f"w4a16_matmul: qweight is {tuple(qweight.shape)}, expected [N, K*bits//32] = "
                         f"[{n}, {k // per_word}] for K={k}, bits={bits}")
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"w4a16_matmul: K={k} must be a multiple of group_size={group_size} "
                         "(use group_size=K for per-channel scales)")
    n_groups = k // group_size
    if scales.dtype not in _FLOAT_DTYPES or tuple(scales.shape) != (n, n_groups):
        raise ValueError(f"w4a16_matmul: scales must be a float tensor of shape [N, K // group_size] = "
                         f"[{n}, {n_groups}], got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (not zeros.is_floating_point() or tuple(zeros.shape) != (n, n_groups)):
        raise ValueError(f"w4a16_matmul: zeros must be None or a float tensor of shape [{n}, {n_groups}], "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"w4a16_matmul: bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    devices = {t.device for t in (x, qweight, scales, zeros, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"w4a16_matmul: all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("w4a16_matmul: CPU tensors need TRITON_INTERPRET=1 set before this file is loaded")
    return n, k


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bits: int = 4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequant(W)^T (+ bias).

    ``x`` may have leading dims (``[..., K]`` -> ``[..., N]``). ``qweight``: int32 [N, K*bits//32] packed LSB
    first; ``scales``/``zeros``: [N, K // group_size] (``zeros=None``: symmetric, zero point 2^(bits-1));
    ``bits`` in {4, 8}. Accumulates in float32; returns x's dtype.

    Raises:
        ValueError: bad shapes, dtypes, ``bits``, a ``group_size`` not dividing K, or mixed devices.
        RuntimeError: triton is missing, or CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if not _HAVE_TRITON:
        raise RuntimeError("w4a16_matmul: triton is not installed")
    n, k = _check(x, qweight, scales, zeros, group_size, bits, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(y.dtype)
        return y.reshape(*lead, n)
    cfg = _config(m, group_size)
    z = zeros if zeros is not None else scales  # a placeholder pointer, never read when HAS_ZEROS is False
    b = bias if bias is not None else scales
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _wxa16_kernel[grid](
        x2, qweight, scales, z, b, y,
        m, n, k,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), z.stride(0), z.stride(1),
        y.stride(0), y.stride(1),
        G=group_size, BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        DOT_FP32=_INTERPRET and x.dtype == torch.bfloat16,
        **cfg,
    )
    return y.reshape(*lead, n)
