#!/usr/bin/env bash
# Regenerates the shipped demo model, musicsteer/models/demo/ (docs/demo_model.md), from seed 0:
# the codec (train_codec.py, step 8,250 of its 16,000-step schedule), the decoder (train_decoder.py)
# and the concept packs (probes extract + probes train, ridge and RFM: notes, intervals and chords). Every stage resumes
# from its run folder under tools/demo_model/runs/ (git-ignored). On the 2-core machine: about 55
# minutes for the codec, 55 for the decoder, 15 for the pack.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${DEMO_RUNS:-tools/demo_model/runs}
OUT=${DEMO_OUT:-musicsteer/models/demo}
MODEL=$([ "$OUT" = musicsteer/models/demo ] && echo demo || echo "$OUT")  # `demo` names the package's copy
export PYTHONPATH=$PWD OMP_NUM_THREADS=1

$PY tools/demo_model/train_codec.py --run "$RUNS/codec_smooth" --set steps=16000 --set ae_steps=3000 \
    --set lr=6e-4 --set lr_final=5e-5 --set quantizer_dropout=0.3 --set smooth_upsampling=true --stop-at 8250
$PY tools/demo_model/train_codec.py --run "$RUNS/codec_smooth" --export "$RUNS/codec_export" --half
$PY tools/demo_model/train_decoder.py --run "$RUNS/decoder" --codec "$RUNS/codec_export"
rm -rf "$OUT" && $PY tools/demo_model/train_decoder.py --run "$RUNS/decoder" --export "$OUT"
# the probes' clips: 3 per label and program (the same seeds as the first 3 of the decoder's data)
$PY -m musicsteer probes dataset --out "$RUNS/data_probes" --families notes,intervals,chords \
    --programs 0,4,11,19,24,26,32,40,42,48,56,60,65,71,73,80 --per-label 3
$PY -m musicsteer probes extract --model "$MODEL" --dataset "$RUNS/data_probes" --out "$RUNS/table1/features_default" \
    --no-progress
# --concepts demo: ridge probes (they steered best here, docs/demo_model.md); --concepts demo-rfm: RFM
$PY -m musicsteer probes train --features "$RUNS/table1/features_default" --out "$OUT/concepts" --method linear \
    --families notes,intervals,chords --no-progress
$PY -m musicsteer probes train --features "$RUNS/table1/features_default" --out "$OUT/concepts_rfm" --method rfm \
    --families notes,intervals,chords --no-progress
du -sh "$OUT"
