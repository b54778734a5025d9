"""Quantization-aware training (LLM-QAT): data-free data generation, training, W-A-KV students."""
