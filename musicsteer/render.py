"""`musicsteer render`: load a model, generate a clip offline, write WAV and tokens.

It knows the file formats and the progress bar; generation itself is in
`engine.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine.config import FRAME_RATE
from .engine.generate import Generation, generate
from .engine.loading import LoadedModel
from .engine.sampling import SamplingSettings
from .errors import UsageError


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    duration: float
    out: Path
    settings: SamplingSettings
    save_tokens: Path | None = None
    progress: bool = True


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
    from tqdm import tqdm

    frames = frames_for(request.duration, model)
    for target in (request.out, request.save_tokens):
        if target is not None and not target.parent.exists():
            raise UsageError(f"cannot write {target}: directory {target.parent} does not exist")
    steps = frames + model.cfg.codebooks - 1
    with tqdm(total=steps, unit="step", desc="render", disable=not request.progress, leave=False) as bar:
        result = generate(model.decoder, model.text, request.prompt, frames, request.settings,
                          on_step=lambda _: bar.update())
    if request.save_tokens is not None:
        np.save(request.save_tokens, result.codes.numpy().astype(np.int64))
    audio = model.codec.decode(result.codes)
    write_wav(request.out, audio, model.codec.sample_rate)
    return result


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")
