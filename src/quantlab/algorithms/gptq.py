"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): pure math on tensors, mirroring the reference ``IST-DASLab/gptq`` ``fasterquant``.

Per Linear with weight W (out, in) and calibration inputs X, GPTQ minimises ``||X W^T - X Q^T||^2``
column by column. With the Hessian ``H = 2 X^T X`` (eq. 1's quadratic form), quantizing column q
and spreading its error over the not-yet-quantized columns gives (paper eq. 2-3, Algorithm 1)::

    err = (w_q - quant(w_q)) / [H^-1]_qq
    W[:, q:] -= err * [H^-1]_{q, q:}

computed with the upper Cholesky factor U of H^-1 (Algorithm 1, "Cholesky reformulation") and
lazy batches of ``block_size`` columns (Algorithm 1, lines 3-13).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quantlab.formats import affine
from quantlab.formats.spec import QuantFormat

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = (2/N) sum_n X_n^T X_n`` over calibration sequences (reference ``add_batch``).

    N counts sequences (the batch dimension), as in the reference; the damping is relative to
    mean(diag(H)), so the normalisation does not change the result. float32 (float64 stays float64).
    """

    def __init__(self, in_features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.H = torch.zeros(in_features, in_features, device=device, dtype=self.dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape (batch, seq, in) or (tokens, in) (the latter counts as one sequence)."""
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        self.H *= self.n / (self.n + batch)
        self.n += batch
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


@dataclass
class GPTQLayerResult:
    """What GPTQ found for one Linear.

    Attributes:
        codes: uint8 (out, in) integer codes, original column order.
        scales / zeros: (out, n_groups) group parameters (zeros hold integers).
        g_idx: int32 (in,) group index of every original column.
        perm: act_order column permutation (None without act_order).
        weight: the dequantized weight (out, in), computed by :func:`dequantize_gidx`.
        loss: sum of the per-column losses ``(w - q)^2 / [H^-1]_qq^2 / 2`` (reference ``Losses``).
        damp: the relative damping actually used (after automatic escalation).
        dead_columns: input channels whose Hessian diagonal was 0 (zeroed in W).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    weight: torch.Tensor
    loss: float
    damp: float
    dead_columns: int


def dequantize_gidx(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``W[:, j] = (q[:, j] - z[:, g_idx[j]]) * s[:, g_idx[j]]`` — the one dequantization of GPTQ results."""
    gi = g_idx.long()
    return (codes.to(scales.dtype) - zeros[:, gi]) * scales[:, gi]


def inverse_hessian_factor(
    H: torch.Tensor, damp: float, damp_increment: float, max_damp: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, escalating ``damp`` until it exists.

    Returns:
        ``(U, damp_used)``.

    Raises:
        RuntimeError: if even ``max_damp`` does not make H positive definite.
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U, d
        if d >= max_damp or damp_increment <= 0:
            raise RuntimeError(
                f"GPTQ: the Hessian is not positive definite even with damping {d:g} x mean(diag H); "
                "use more calibration samples or raise quantizer.max_damp"
            )
        d = min(max_damp, d + damp_increment)


def _col_qparams(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row parameters of a column slice W[:, a:b] (one group), each (out,)."""
    per_row = QuantFormat(bits=fmt.bits, group_size=-1, symmetric=fmt.symmetric, zero_in_range=fmt.zero_in_range)
    s, z = affine.choose_qparams(w, per_row)
    return s[:, 0], z[:, 0]


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: QuantFormat,
    *,
    damp: float = 0.01,
    damp_increment: float = 0.01,
    max_damp: float = 1.0,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQLayerResult:
    """GPTQ for one weight matrix (paper Algorithm 1; reference ``GPTQ.fasterquant``).

    Args:
        W: weight (out, in); not modified.
        H: Hessian (in, in) from :class:`HessianAccumulator`; not modified.
        fmt: the integer format (bits, group size, symmetry, zero convention).
        damp: relative dampening ``lambda = damp * mean(diag H)`` added to the diagonal.
        damp_increment / max_damp: automatic escalation when the Cholesky factorisation fails.
        block_size: lazy-batch width B (Algorithm 1).
        act_order: quantize columns in order of decreasing ``diag(H)`` ("desc_act").
        static_groups: group parameters from the original W, before any error update (so act_order
            does not reorder group membership); otherwise they are computed when a group's first
            column is reached, from the error-updated weights (the reference default).
    """
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dt).clone()
    H = H.detach().to(dt).clone()
    n_out, n_in = W.shape
    g = fmt.effective_group_size(n_in)
    maxq = fmt.maxq

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups or fmt.group_size == -1:
        s_all, z_all = affine.choose_qparams(W, fmt)  # (out, n_groups) from the original (dead-zeroed) W
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    U, damp_used = inverse_hessian_factor(H, damp, damp_increment, max_damp)

    codes = torch.zeros_like(W)
    n_groups = n_in // g
    scales = torch.zeros(n_out, n_groups, dtype=dt, device=W.device)
    zeros = torch.zeros_like(scales)
    col_group = [0] * n_in  # permuted position -> group
    static = static_groups or fmt.group_size == -1
    order = perm.tolist() if perm is not None else list(range(n_in))
    loss = torch.zeros((), dtype=dt, device=W.device)
    s = z = None
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Win = torch.empty_like(W1)  # each column as it was when quantized (for the loss)
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                grp = order[col] // g
                s, z = s_all[:, grp], z_all[:, grp]
            else:
                grp = col // g
                if col % g == 0:
                    # first column of a group: parameters from W[:, col:col+g], which holds the updates of
                    # earlier lazy blocks but not this block's (the reference; exact when g == block_size)
                    s, z = _col_qparams(W[:, col:col + g], fmt)
                    scales[:, grp], zeros[:, grp] = s, z
            col_group[col] = grp
            w = W1[:, i]
            Win[:, i] = w
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, col] = q
            wq = Q1[:, i]
            torch.mul(q - z, s, out=wq)
            err = Err1[:, i]
            torch.div(w - wq, U1[i, i], out=err)
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
        loss += (((Win - Q1) / torch.diag(U1)[None, :]) ** 2).sum() / 2
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static_groups or fmt.group_size == -1:
        scales, zeros = s_all, z_all
    cg = torch.tensor(col_group, dtype=torch.int32, device=W.device)
    inv = torch.argsort(perm) if perm is not None else None
    if inv is not None:
        codes, cg = codes[:, inv], cg[inv]
    g_idx = cg
    codes_u8 = codes.to(torch.uint8)
    weight = dequantize_gidx(codes_u8, scales, zeros, g_idx)
    return GPTQLayerResult(codes_u8, scales, zeros, g_idx, perm, weight, float(loss), damp_used, int(dead.sum()))
