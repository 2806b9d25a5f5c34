#!/usr/bin/env bash
# What only a GPU can show: the steering and attention kernels natively on CUDA, the CUDA-graph
# step replayed with changed strengths against the eager step, and `bench latency` for small,
# medium and large (eager and graphed, float16 and bfloat16, 0 and 8 concepts), and the stateful
# streaming codec per frame on the GPU. Run from the
# repository root on a CUDA machine with a CUDA build of torch and triton installed:
#   PYTHON=python3 bash scripts/gpu_checks.sh        (results go to bench/results/, or $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-bench/results}
mkdir -p "$out"
"$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'"
gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
"$py" -m pytest -q tests/test_kernels.py tests/test_triton_attention.py tests/test_graph_step.py 2>&1 \
  | tee "$out/gpu-tests-$gpu.txt"
"$py" -m pytest -q tests/test_codec_stream.py -k cuda 2>&1 | tee -a "$out/gpu-tests-$gpu.txt"
for model in small medium large; do
  for dtype in float16 bfloat16; do
    "$py" -m musicsteer bench latency --model "$model" --compute cuda --dtype "$dtype" --cuda-graph \
      --concepts 0,8 --steps 200 --json "$out/latency-$gpu-$model-$dtype-graph.json"
  done
  "$py" -m musicsteer bench latency --model "$model" --compute cuda --dtype float16 --concepts 0,8 --steps 200 \
    --baseline transformers --json "$out/latency-$gpu-$model-float16-eager.json"
done
"$py" -m musicsteer bench codec --model small --compute cuda --frames 400 --json "$out/codec-$gpu-small.json"
