#!/bin/bash
# Issue 16 numbers on SmolLM2-135M (its "fp" is dequantized Q4_1): the packed model and the exported
# checkpoints against the fake-quant run they came from, perplexity on stdlib (40 x 512), paired CI over windows.
#   scripts/deploy_smollm2.sh [RESULTS_DIR]     (about 15 min on 2 CPU cores)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export QUANTLAB_RESULTS=${1:-results/deploy_smollm2}
run() { local name=$1; shift; $PY -m quantlab "$@" "eval=[ppl_local]" experiment=dep_$name > /dev/null \
  2> "$QUANTLAB_RESULTS.$name.log" || echo "run $name failed: see $QUANTLAB_RESULTS.$name.log"; }
dir() { dirname "$(ls -t "$QUANTLAB_RESULTS"/runs/dep_$1/*/result.json | head -1)"; }
cmp() { echo "== $1 -> $2"; $PY scripts/compare_runs.py "$QUANTLAB_RESULTS/runs/dep_$1" "$QUANTLAB_RESULTS/runs/dep_$2"; }
mkdir -p "$QUANTLAB_RESULTS"
# RTN w4 g64 asymmetric (AWQ's zero convention): fake quant, exporting compressed-tensors and AWQ on the way
run rtn_fake quantizer=rtn "deploy.export=[compressed-tensors,awq]"
run rtn_packed_ref quantizer=rtn deploy.pack=true deploy.backend=reference
run rtn_packed_cpu quantizer=rtn deploy.pack=true deploy.backend=cpu
RTN=$(dir rtn_fake)
run rtn_ct_ref quantizer=none model.path=$RTN/export/compressed-tensors deploy.backend=reference
run rtn_ct_cpu quantizer=none model.path=$RTN/export/compressed-tensors deploy.backend=cpu
run rtn_awq_ref quantizer=none model.path=$RTN/export/awq deploy.backend=reference
# GPTQ symmetric with act_order (g_idx): exported as GPTQ v1 afterwards by the CLI, loaded back
run gptq_fake quantizer=gptq quantizer.format.symmetric=true quantizer.act_order=true
GPTQ=$(dir gptq_fake)
rm -rf "$QUANTLAB_RESULTS/gptq_export"
$PY -m quantlab.export "$GPTQ" "$QUANTLAB_RESULTS/gptq_export" --format gptq 2>> "$QUANTLAB_RESULTS.gptq_export.log"
run gptq_v1_ref quantizer=none model.path=$QUANTLAB_RESULTS/gptq_export deploy.backend=reference
run gptq_v1_cpu quantizer=none model.path=$QUANTLAB_RESULTS/gptq_export deploy.backend=cpu
for pair in "rtn_fake rtn_packed_ref" "rtn_fake rtn_packed_cpu" "rtn_fake rtn_ct_ref" "rtn_fake rtn_ct_cpu" \
            "rtn_fake rtn_awq_ref" "gptq_fake gptq_v1_ref" "gptq_fake gptq_v1_cpu"; do cmp $pair; done
for r in rtn_fake rtn_packed_ref rtn_packed_cpu rtn_ct_ref rtn_ct_cpu rtn_awq_ref gptq_fake gptq_v1_ref gptq_v1_cpu; do
  $PY - "$(dir $r)" "$r" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1] + "/result.json"))
m, qs = r["metrics"], r.get("quant_summary") or {}
print(f"{sys.argv[2]:16s} ppl {m['ppl/local_stdlib']:.6f}  footprint {m['memory/footprint_gb'] * 1e3:8.2f} MB"
      f"  packed_est {m.get('memory/packed_est_gb', float('nan')) * 1e3:8.2f} MB  eval {r['provenance']['ppl/local_stdlib']['eval_wall_s']:.1f} s"
      f"  [{qs.get('method_label')}]")
PYEOF
done
