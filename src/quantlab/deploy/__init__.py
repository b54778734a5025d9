"""Real low-bit models: packing a run's codes into :class:`~quantlab.nn.packed.PackedLinear` layers, export
to compressed-tensors / GPTQ / AWQ checkpoints and loading them back."""
