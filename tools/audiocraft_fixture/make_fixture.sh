#!/usr/bin/env bash
# Regenerate tests/fixtures/audiocraft_tiny/ with audiocraft's own code.
#
# audiocraft 1.3.0 pins torch==2.1.0, so it lives in a scratch venv outside the project
# (default /tmp/acvenv, ~5.6 GB because the PyPI torch wheel pulls the CUDA libraries).
# Versions are pinned by constraints.txt (a pip freeze of the venv the committed fixture came from).
# The Hydra config tree that audiocraft trains with is not in its wheel, only in its sdist, so the
# sdist is downloaded (pip download) and its config/ is handed to make_fixture.py.
#
# Needs only PyPI. Safe to rerun: the venv and sdist are reused, outputs are byte-identical.
#
#   tools/audiocraft_fixture/make_fixture.sh
#   AUDIOCRAFT_VENV=/some/venv tools/audiocraft_fixture/make_fixture.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${AUDIOCRAFT_VENV:-/tmp/acvenv}"
SDIST_DIR="${AUDIOCRAFT_SDIST_DIR:-/tmp/audiocraft-1.3.0-sdist}"
OUT="$REPO/tests/fixtures/audiocraft_tiny"
CONSTRAINTS="$HERE/constraints.txt"

log() { echo "[make_fixture.sh] $*"; }

# 1. Scratch venv (created if missing; the installs below are no-ops when already satisfied).
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install --disable-pip-version-check --quiet -c "$CONSTRAINTS")
log "installing pinned packages into $VENV"
# torch first and explicitly (a local find-links may offer another torch build).
"${PIP[@]}" torch torchaudio
# audiocraft's own requirements pin torch 2.1; install it and xformers without dependencies
# (xformers then only warns on import; LMModel runs on CPU with the 'torch' attention backend).
"${PIP[@]}" --no-deps audiocraft xformers
# What audiocraft actually imports, plus hydra-core (config composition) and protobuf
# (transformers needs it to convert spiece.model into tokenizer.json).
"${PIP[@]}" einops omegaconf hydra-core num2words julius transformers tokenizers sentencepiece \
    protobuf huggingface_hub safetensors tqdm av soundfile spacy librosa flashy torchmetrics numpy

# 2. audiocraft's Hydra config tree, from the sdist.
if [ ! -f "$SDIST_DIR/audiocraft-1.3.0/config/config.yaml" ]; then
    log "fetching the audiocraft 1.3.0 sdist for its config/ tree"
    mkdir -p "$SDIST_DIR"
    "$VENV/bin/pip" download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
        audiocraft==1.3.0 -d "$SDIST_DIR"
    tar -xzf "$SDIST_DIR/audiocraft-1.3.0.tar.gz" -C "$SDIST_DIR" audiocraft-1.3.0/config
fi

# 3. Build the fixture.
log "running make_fixture.py -> $OUT"
"$VENV/bin/python" "$HERE/make_fixture.py" --out "$OUT" \
    --config-dir "$SDIST_DIR/audiocraft-1.3.0/config"
log "done"
