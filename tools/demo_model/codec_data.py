"""The codec's training data: the project's own FluidSynth probe dataset, built through
`musicsteer.probes.dataset.build_dataset` (seeded, resumable), split into training and
held-out clips by a hash of each clip's id, held in memory as int16.

Batches are a pure function of (seed, step): crops are drawn by a numpy generator seeded
with both, so a resumed run reads the same batches as an uninterrupted one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

# 16 GM programs, one or two per family: keyboards, mallets, organ, guitars, bass, strings,
# brass, reeds, pipes, a synth lead.
PROGRAMS = (0, 4, 11, 19, 24, 26, 32, 40, 42, 48, 56, 60, 65, 71, 73, 80)
HELD_OUT_SHARE = 0.1


@dataclass(frozen=True)
class DataSpec:
    families: tuple[str, ...] = ("notes",)
    programs: tuple[int, ...] = PROGRAMS
    per_label: int = 7  # notes: 7 octave variations, each once
    seed: int = 0


def build(directory: Path, spec: DataSpec, workers: int = 1) -> Path:
    """Render (or resume) the dataset with the project's own dataset code."""
    from musicsteer.probes.dataset import build_dataset

    build_dataset(directory, families=list(spec.families), programs=list(spec.programs),
                  per_label=spec.per_label, seed=spec.seed, sample_rate=32000, workers=workers,
                  progress=False)
    return directory


@dataclass
class Clips:
    audio: np.ndarray  # (clips, samples) int16
    rows: list  # dataset.ClipRow, in the order of `audio`

    def batch(self, seed: int, step: int, size: int, crop: int, stream: int = 1) -> torch.Tensor:
        """`size` random crops of `crop` samples, as float32 (B, 1, crop); the same for the
        same (seed, step, stream)."""
        rng = np.random.default_rng([seed, step, stream])
        idx = rng.integers(0, len(self.audio), size)
        start = rng.integers(0, self.audio.shape[1] - crop + 1, size)
        x = np.stack([self.audio[i, s:s + crop] for i, s in zip(idx, start)]).astype(np.float32) / 32768.0
        return torch.from_numpy(x)[:, None]


def split(directory: Path, families: tuple[str, ...] = ("notes",)) -> tuple[Clips, Clips]:
    """(training, held-out) clips of `families`: the held-out ones are the tenth with the
    lowest crc32 of their clip path (at least one)."""
    from musicsteer.probes.dataset import load_manifest

    rows = sorted((r for r in load_manifest(directory) if r.family in families), key=lambda r: r.clip)
    if not rows:
        raise SystemExit(f"{directory}: no clips of {', '.join(families)}")
    by_hash = sorted(rows, key=lambda r: zlib.crc32(r.clip.encode()))
    held = {r.clip for r in by_hash[:max(1, round(HELD_OUT_SHARE * len(rows)))]}
    train = [r for r in rows if r.clip not in held]
    test = [r for r in rows if r.clip in held]
    return _load(train or test), _load(test)


def _load(rows: list) -> Clips:
    audio = [sf.read(r.path, dtype="int16")[0] for r in rows]
    return Clips(np.stack(audio), rows)


def clip_pitch(row) -> int:
    """The MIDI pitch a `notes` clip plays (after the dataset moved it into its program's keys)."""
    from musicsteer.probes import theory

    clip = theory.make_clip(row.family, row.label, row.program, row.seed)
    return clip.pitched()[0].pitch
