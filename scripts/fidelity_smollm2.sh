#!/bin/bash
# Issue 15 numbers on SmolLM2-135M (its "fp" is dequantized Q4_1): each fidelity default against the old
# behaviour it replaced (kept as a named option), perplexity on stdlib (40 x 512), paired CI over windows.
#   scripts/fidelity_smollm2.sh [RESULTS_DIR]     (about 25 min on 2 CPU cores)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export QUANTLAB_RESULTS=${1:-results/fidelity_smollm2}
run() { local name=$1; shift; $PY -m quantlab "$@" experiment=fid_$name > /dev/null 2> "$QUANTLAB_RESULTS.$name.log" \
  || echo "run $name failed: see $QUANTLAB_RESULTS.$name.log"; }
cmp() { $PY scripts/compare_runs.py "$QUANTLAB_RESULTS/runs/fid_$1" "$QUANTLAB_RESULTS/runs/fid_$2"; }
mkdir -p "$QUANTLAB_RESULTS"
# special tokens: SmolLM2's tokenizer adds none, so the fp baseline must be unchanged (9.7263)
run fp quantizer=none "eval=[ppl_local]"
# GPTQ symmetric grid: GPTQ's own --sym grid (new) vs LLM-QAT's restricted grid (old), weight-only and 4-8-4
run gptq_w4pcs_restricted quantizer=gptq quantizer/format=w4_perchannel quantizer.format.symmetric=true \
  quantizer.format.symmetric_grid=restricted "eval=[ppl_local]"
run gptq_w4pcs_full quantizer=gptq quantizer/format=w4_perchannel quantizer.format.symmetric=true "eval=[ppl_local]"
run gptq_484_restricted +exp=llmqat_smollm2 quantizer=gptq quantizer.wakv=4-8-4 quantizer.format.symmetric_grid=restricted
run gptq_484_full +exp=llmqat_smollm2 quantizer=gptq quantizer.wakv=4-8-4
# the same 4-8-4 arm on one BLAS thread: GPTQ's numerical sensitivity to float summation order
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run gptq_484_restricted_1thread +exp=llmqat_smollm2 quantizer=gptq \
  quantizer.wakv=4-8-4 quantizer.format.symmetric_grid=restricted
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 run gptq_484_full_1thread +exp=llmqat_smollm2 quantizer=gptq quantizer.wakv=4-8-4
# Roy's nf4 compute dtype: bfloat16 (new) vs the model dtype fp32 (old)
run nf4_fp32 quantizer=bnb_nf4 quantizer.compute_dtype=null "eval=[ppl_local]"
run nf4_bf16 quantizer=bnb_nf4 "eval=[ppl_local]"
$PY -m quantlab.report "$QUANTLAB_RESULTS" --metrics ppl > /dev/null
grep -h '"ppl/local_stdlib":' "$QUANTLAB_RESULTS"/runs/fid_fp/*/result.json | head -1
cmp gptq_w4pcs_restricted gptq_w4pcs_full
cmp gptq_484_restricted gptq_484_full
cmp gptq_484_restricted_1thread gptq_484_full_1thread
cmp gptq_484_restricted_1thread gptq_484_restricted
cmp nf4_fp32 nf4_bf16
echo "wall times: python -m quantlab.report $QUANTLAB_RESULTS (columns wall_s, quant_time_s)"
