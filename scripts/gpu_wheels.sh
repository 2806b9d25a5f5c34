#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels the GPU machine's image lacks into gpu-wheels/
# (git-ignored), for that image's Python (3.12, x86-64 Linux): the C ring buffer the live stream
# plays through (rtmixer's _rtmixer, pa-ringbuffer, cffi), soundfile, python-osc, mido and xrfm.
# The image has no network; carry the folder to it (the device tool's carry: ["gpu-wheels"]) and
# scripts/gpu_checks.sh installs from it with --no-index. Everything else musicsteer needs (torch
# with CUDA, Triton, transformers, safetensors, sentencepiece, numpy, scipy, matplotlib, tqdm,
# pyyaml, scikit-learn) is in the image already.
#   bash scripts/gpu_wheels.sh            (PYTHON_VERSION=3.12 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dest=gpu-wheels
mkdir -p "$dest"
# --no-deps: the list is complete; each package's own requirements are either here or in the image.
"$py" -m pip download --dest "$dest" --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "cffi>=1.17" "pycparser" "pa-ringbuffer>=0.1.4,<0.2" "rtmixer>=0.1.7,<0.2" "sounddevice>=0.4.6,<0.6" \
  "soundfile>=0.12" "python-osc>=1.8" "mido>=1.3,<2" "xrfm>=0.4.5,<0.5"
ls -l "$dest"
du -sh "$dest"
