"""A tiny Llama built in code (no download) for tests and seconds-long experiments.

Same architecture family as the real targets (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP),
seeded, with a byte-level tokenizer that needs no vocabulary file. A few input channels of every
RMSNorm are scaled up so the Linears after them see activation outliers, as real LLMs do (the
phenomenon SmoothQuant / AWQ / SmoothQuant+ address); the torchao SmoothQuant tests use the same idea.
"""
from __future__ import annotations

import logging

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + ``<pad>``, ``<s>``, ``</s>`` (ids 256..258).

    Lossless for any UTF-8 text; built entirely in code.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def build_tiny_llama(
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    outlier_channels: tuple[int, ...] = (3, 17, 42),
    outlier_scale: float = 20.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the tiny model and its tokenizer.

    Args:
        seed: seeds weight initialisation (``torch.manual_seed``); same seed, same weights.
        outlier_channels: hidden channels whose RMSNorm gains (input and post-attention norms of every
            layer) are multiplied by ``outlier_scale``, creating activation-outlier input channels
            for q/k/v and gate/up.
        dtype: parameter dtype (float64 for exactness tests).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    tok = byte_tokenizer()
    for c in outlier_channels:
        if not 0 <= c < hidden_size:
            raise ValueError(f"outlier channel {c} outside hidden size {hidden_size}")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        # HF's default init (std 0.02) makes activations tiny; use a wider init so the random model
        # produces non-degenerate logits, and random norm gains so channels differ in scale.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=1.0 / p.shape[1] ** 0.5)
            elif name.endswith("norm.weight"):
                torch.nn.init.uniform_(p, 0.5, 1.5)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[list(outlier_channels)] *= outlier_scale
    model = model.to(dtype).eval()  # type: ignore[arg-type]  # transformers types .to with functools.wraps
    model.generation_config.pad_token_id = tok.pad_token_id
    log.info("built tiny llama: %d params, outlier channels %s x%g", model.num_parameters(), outlier_channels, outlier_scale)
    return model, tok
