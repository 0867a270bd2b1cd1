#!/usr/bin/env bash
# What this project runs on a lent NVIDIA GPU (no vLLM installed there, no network): vLLM's DSV4 Triton kernels
# from the source bundle compiled by Triton (conformance run + benchmark), then the graph-replay suite for the
# planted plugin subject, the reference and the built-in mutants. Outputs under $OUT (default out/gpu).
#   python -m conformance.subjects._vllm_source bundle --out .carry/vllm-src    # here, where vLLM is installed
#   bash benchmarks/run_gpu.sh                                                   # there
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD DSV4_VLLM_SRC=${DSV4_VLLM_SRC:-$PWD/.carry/vllm-src}
PY=${PYTHON:-python3}
nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for prof in ocp gfx942; do
  $PY benchmarks/bench_vllm_triton_gpu.py --profile $prof --json "$OUT/bench-$prof.json" 2>&1 | tee "$OUT/bench-$prof.log" | tail -8
  s=$(date +%s)
  timeout ${RUN_TIMEOUT:-200} $PY -m conformance run --subject vllm-triton-gpu:$prof --out "/tmp/run-$prof" > "$OUT/run-$prof.log" 2>&1
  echo "run vllm-triton-gpu:$prof rc=$? in $(( $(date +%s) - s )) s"; tail -6 "$OUT/run-$prof.log"
  cat /tmp/run-$prof/results/*.jsonl > "$OUT/results-$prof.jsonl" 2>/dev/null
done
cp /tmp/run-ocp/report.html "$OUT/report-ocp.html" 2>/dev/null
if [ "${GRAPH:-1}" = 1 ]; then
  timeout 440 $PY -m conformance.checks.graph \
    --subject tests.graph.planted_subject:factory --subject reference --subject conformance.checks.graph_mutants:factory \
    --subject vllm-triton-gpu:ocp --subject tests.graph.vllm_planted:factory \
    ${GRAPH_EXTRA:-} --inputs 8 --replays 2 --processes 5 --parallel 8 --timeout 120 --budget-s ${GRAPH_BUDGET:-290} \
    --out "$OUT/graph" > "$OUT/graph-suite.log" 2>&1; echo "graph suite rc=$?"; grep -E '^(vllm|tests.graph.vllm)' "$OUT/graph-suite.log"; tail -4 "$OUT/graph-suite.log"
  DSV4_GRAPH_SUMMARY="$OUT/graph/graph-summary.json" timeout 60 $PY -m pytest tests/graph/test_graph_gpu.py -q \
    -p no:cacheprovider 2>&1 | tail -15
fi
