#!/usr/bin/env bash
# What only a GPU can show, in one device call: the steering and attention kernels natively on
# CUDA, the CUDA-graph step replayed with changed strengths against the eager step, the stateful
# streaming codec per frame, `bench latency` (graphed and eager, float16 and bfloat16, 0 and 8
# concepts) for small, large and medium, and a live stream through the producer on the GPU.
#
# Expected time on the lent H200 (16 cores): about 5 to 6 minutes, most of it building the random
# large and medium models. Checks run most useful first; one that would start after BUDGET_S
# (default 360 s) is skipped and logged, and each is cut at RUN_S (default 120 s; the tests 240 s),
# so the script ends within about 8 minutes whatever happens.
#
# From the repository root on a CUDA machine with torch (CUDA) and triton:
#   PYTHON=python3 bash scripts/gpu_checks.sh        (records in bench/results/, or under $OUT)
# Through the device tool, whose image has no network: first `bash scripts/gpu_wheels.sh` here
# (the wheels it lacks, into the git-ignored gpu-wheels/), then
#   run(command="PYTHON=python3 bash scripts/gpu_checks.sh", carry=["gpu-wheels"], timeout_s=560)
# With $OUT set it leaves two files there: gpu-checks.log (all output) and gpu-results.tar (the
# JSON records, one per run). It exits 1 if any check failed.
set -uo pipefail  # no -e: a failing check must not hide the others' results
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
budget=${BUDGET_S:-360}
run_s=${RUN_S:-120}
if [ -n "${OUT:-}" ]; then results=$(mktemp -d); log=$OUT/gpu-checks.log; else results=bench/results; log=$results/gpu-checks.log; fi
mkdir -p "$results"
failed=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND while the budget lasts, cut at SECONDS
  local name=$1 limit=$2
  shift 2
  if (( SECONDS > budget )); then
    echo "== skipped $name: past the ${budget} s budget"
    return
  fi
  echo "== $name (at ${SECONDS} s)"
  timeout "$limit" "$@"
  local rc=$?
  if (( rc )); then
    echo "== $name FAILED (exit $rc)"
    failed=$((failed + 1))
  fi
}

latency() {  # latency MODEL DTYPE graph|eager [more options]: one `bench latency` record
  local model=$1 dtype=$2 mode=$3
  shift 3
  step "latency $model $dtype $mode" "$run_s" "$py" -m musicsteer bench latency --model "$model" --compute cuda \
    --dtype "$dtype" --concepts 0,8 --steps 200 --json "$results/latency-$gpu-$model-$dtype-$mode.json" "$@"
}

checks() {
  if compgen -G "gpu-wheels/*.whl" >/dev/null; then  # carried wheels: installed beside, not into, the image
    site=$(mktemp -d)
    "$py" -m pip install --quiet --no-index --no-deps --target "$site" gpu-wheels/*.whl || failed=$((failed + 1))
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'" || return 1
  gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
  export PYTHONUNBUFFERED=1
  step "gpu tests" 240 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_triton_attention.py \
    tests/test_graph_step.py tests/test_steering_modes.py
  step "codec stream test on cuda" "$run_s" "$py" -m pytest -q -p no:cacheprovider tests/test_codec_stream.py -k cuda
  latency small float16 graph --cuda-graph
  latency small float16 eager --baseline transformers
  latency large float16 graph --cuda-graph
  step "codec small" "$run_s" "$py" -m musicsteer bench codec --model small --compute cuda --frames 400 \
    --json "$results/codec-$gpu-small.json"
  if "$py" -c "import _rtmixer, pa_ringbuffer" 2>/dev/null; then
    step "stream small" "$run_s" "$py" -m musicsteer bench stream --model small --compute cuda --fast --seconds 40 \
      --json "$results/stream-$gpu-small-fast.json"
  else
    echo "== skipped stream small: no ring buffer here (bash scripts/gpu_wheels.sh, then carry gpu-wheels)"
  fi
  latency medium float16 graph --cuda-graph
  latency large bfloat16 graph --cuda-graph
  latency small bfloat16 graph --cuda-graph
  latency medium bfloat16 graph --cuda-graph
  latency large float16 eager --baseline transformers
  latency medium float16 eager
  echo "== done in ${SECONDS} s, $failed failed"
  (( failed == 0 ))
}

checks 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
  tar -cf "$OUT/gpu-results.tar" -C "$results" .
fi
exit "$status"
