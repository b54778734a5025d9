"""Sampling-hyperparameter sweeps (Roy 2023): prompts, grid, evaluator, analysis."""
