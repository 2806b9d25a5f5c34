"""`musicsteer render`: load a model, generate a clip offline, write WAV and tokens.

It knows the file formats and the progress bar; generation itself is in
`model.generate`, steering from the flags in `steering.build`.
"""

from __future__ import annotations

import math
import wave
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .model.config import FRAME_RATE
from .model.generate import Generation, generate
from .model.loading.load import LoadedModel
from .model.sampling import SamplingSettings
from .steering.build import make_steering
from .steering.plan import SteeringSettings


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    duration: float
    out: Path
    settings: SamplingSettings
    save_tokens: Path | None = None
    progress: bool = True
    concepts: Path | None = None  # a concept pack directory
    steer: dict[str, float] = field(default_factory=dict)  # concept -> strength
    schedules: dict[str, str] = field(default_factory=dict)  # concept -> schedule spec
    steering: SteeringSettings = SteeringSettings()


def frames_for(duration: float, model: LoadedModel) -> int:
    if not duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {duration}")
    frames = max(1, round(duration * FRAME_RATE))
    if frames > model.cfg.max_frames:
        raise UsageError(
            f"--duration {duration:g} s needs {frames} frames; this model holds {model.cfg.max_frames} "
            f"({model.cfg.max_frames / FRAME_RATE:.2f} s) in one pass")
    return frames


def render(model: LoadedModel, request: RenderRequest) -> Generation:
    frames = frames_for(request.duration, model)
    for target in (request.out, request.save_tokens):
        if target is not None and not target.parent.exists():
            raise UsageError(f"cannot write {target}: directory {target.parent} does not exist")
    steering = make_steering(model, request.concepts, request.steer, request.schedules, request.steering,
                             request.settings.batch)
    result, audio = synthesize(model, request.prompt, frames, request.settings, steering, request.progress)
    if request.save_tokens is not None:
        np.save(request.save_tokens, result.codes.numpy().astype(np.int64))
    write_wav(request.out, audio, model.codec.sample_rate)
    return result


def synthesize(model: LoadedModel, prompt: str, frames: int, settings: SamplingSettings,
               steering: tuple = (None, None), progress: bool = False) -> tuple[Generation, np.ndarray]:
    """Generate `frames` frames, steered by `steering` (Steerer, SteeringPlan) or not, and decode
    them: (the generation, float32 audio)."""
    from tqdm import tqdm

    steerer, plan = steering
    before_step = (lambda s: plan.write(s, steerer)) if plan is not None else None
    steps = frames + model.cfg.codebooks - 1
    with tqdm(total=steps, unit="step", desc="render", disable=not progress, leave=False) as bar, \
            (steerer or nullcontext()):
        result = generate(model.decoder, model.text, prompt, frames, settings,
                          before_step=before_step, on_step=lambda _: bar.update())
    return result, model.codec.decode(result.codes)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM, samples (frames,) or (frames, channels), with the standard library's wave."""
    scaled = np.floor(np.clip(audio, -1.0, 1.0) * 32768.0)  # libsndfile's scale and rounding: the same samples
    pcm = np.clip(scaled, -32768, 32767).astype("<i2")  # as soundfile wrote
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, str]:
    """['NAME=VALUE', ...] -> {NAME: VALUE}; a malformed item is a usage error."""
    out: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise UsageError(f"{flag} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def parse_strengths(items: list[str] | None) -> dict[str, float]:
    out = {}
    for name, value in parse_assignments(items, "--steer").items():
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--steer {name}={value}: the strength must be a number") from None
        if not math.isfinite(out[name]):
            raise UsageError(f"--steer {name}={value}: the strength must be finite")
    return out
