"""Storage layouts of packed integer weights: pure functions between a
:class:`~quantlab.formats.codes.QuantizedWeight` and the tensors of one format.

* :mod:`.compressed_tensors` — ``pack-quantized`` (vLLM's native W4A16 format, llm-compressor's output;
  also quantlab's in-memory layout of :class:`~quantlab.nn.packed.PackedLinear`);
* :mod:`.gptq` — GPTQ v1 (``checkpoint_format: gptq``, AutoGPTQ / GPTQModel / vLLM);
* :mod:`.awq` — AWQ GEMM (AutoAWQ / vLLM);
* :mod:`.aten_int4` — torch's CPU int4 kernel layout (CPU-dependent: built at load time, never saved).
"""
