#!/bin/bash
# Issue 16's GPU checks, as one script for a lent GPU machine (device tool): the compiled Triton kernel and
# the packed model on CUDA (tests marked gpu), the kernel table with the Triton and vLLM Marlin arms, and,
# when vLLM is installed, serving the exported SmolLM2 checkpoint. Writes everything below $OUT (or ./gpu_out).
#   scripts/gpu_deploy_check.sh            (about 6 min on one H100 once the venv exists)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" \
  > "$OUT/versions.txt" 2>&1
# the gpu-marked tests (the kernel runs compiled in a subprocess without TRITON_INTERPRET)
$PY -m pytest -q -m gpu tests/test_triton_kernel.py tests/test_deploy.py tests/test_deploy_layouts.py \
  > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest gpu rc=$?" >> "$OUT/pytest_gpu.txt"
# kernel micro-benchmark: fp16 vs Triton (and Marlin when vllm imports), batch 1/4/16, Llama-7B and SmolLM2 shapes
env -u TRITON_INTERPRET $PY scripts/bench_kernels.py --skip-decode --json "$OUT/bench_kernels_gpu.json" \
  > "$OUT/bench_kernels_gpu.txt" 2>&1
# serving: vLLM on the compressed-tensors export of RTN w4 g64 SmolLM2, against its fp16 checkpoint
if $PY -c "import vllm" 2>/dev/null; then
  env -u TRITON_INTERPRET $PY scripts/bench_serving.py --quick --out "$OUT/serving_vllm" > "$OUT/serving_vllm.txt" 2>&1
else
  echo "vllm not installed: serving on GPU not run" > "$OUT/serving_vllm.txt"
fi
tail -n 40 "$OUT"/*.txt
