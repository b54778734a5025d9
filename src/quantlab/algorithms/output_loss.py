"""Whole-model quantization losses between a reference and a quantized model's final outputs.

SmoothQuant+ (section 3.1.3) chooses alpha by "the quantization loss of the entire model"; the
paper does not define it. These are the candidates, all computed from the *final hidden states
after the final norm* (h, shape (tokens, hidden)), so the reference model's outputs are stored
once at hidden size instead of vocabulary size:

* ``logits_mse``: mean over tokens and vocabulary of ``(W_head h_q - W_head h_fp)^2``. With
  ``d = h_q - h_fp`` and the Gram matrix ``G = W_head^T W_head`` (hidden x hidden, computed once)
  this equals ``sum_t d_t^T G d_t / (T * V)`` exactly (a bias on lm_head cancels), which avoids the
  vocabulary-sized matmul: 85x fewer multiply-adds for SmolLM2 (V = 49152, hidden 576).
* ``hidden_mse``: mean of ``d^2``.
* ``kl``: mean over tokens of KL(p_fp || p_q) of the softmax distributions (needs full logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("logits_mse", "hidden_mse", "kl")


def gram(head_weight: torch.Tensor) -> torch.Tensor:
    """``G = W^T W`` for an output projection W (vocab, hidden), in float32 (float64 stays)."""
    dt = torch.float64 if head_weight.dtype == torch.float64 else torch.float32
    w = head_weight.detach().to(dt)
    return w.T @ w


def output_loss_sum(kind: str, h_q: torch.Tensor, h_fp: torch.Tensor, head_weight: torch.Tensor,
                    G: torch.Tensor | None = None) -> float:
    """Sum over tokens of the per-token loss (divide by the token count for the mean).

    For ``logits_mse`` the per-token value is already averaged over the vocabulary.
    """
    dt = G.dtype if G is not None else torch.promote_types(h_fp.dtype, torch.float32)
    hq = h_q.reshape(-1, h_q.shape[-1]).to(dt)
    hf = h_fp.reshape(-1, h_fp.shape[-1]).to(dt)
    if kind == "hidden_mse":
        return float(((hq - hf) ** 2).mean(dim=-1).sum())
    if kind == "logits_mse":
        if G is None:
            raise ValueError("logits_mse needs the Gram matrix")
        d = hq - hf
        return float(((d @ G) * d).sum() / head_weight.shape[0])
    if kind == "kl":
        w = head_weight.to(device=hq.device, dtype=dt)
        lp_fp = F.log_softmax(hf @ w.T, dim=-1)
        lp_q = F.log_softmax(hq @ w.T, dim=-1)
        return float(F.kl_div(lp_q, lp_fp, log_target=True, reduction="sum"))
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
