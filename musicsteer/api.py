"""Threading model: `load_model`, `make_pack` and `render_clip` run in the caller's
thread and block until done. `start_live` builds the session in the caller's thread,
starts the producer and sink threads, and returns a `LiveSession` once playback has
started. Its setters (`set`, `prompt`) may be called from any thread: they validate
and store a target in the ControlState (O(1), never waiting on the producer), which
applies it at the next step. `stats` and `get` read snapshots. `wait`, `stop` and the
context manager belong to the thread that started the session.

The Python API: load a model, render a clip, run a live session, for a notebook or
another program (a host application, a plugin bridge).

Thin by design: it turns keyword arguments into the same requests the CLI builds and
delegates to `model.loading`, `render`, `live.session` and `steering.pack`. The names
exported from `musicsteer` are listed in its `__all__`; everything else is internal.
It knows nothing of sockets, MIDI or kernels; a live session's OSC server and MIDI
input are the live package's, switched on by the same settings as on the command line.
"""

from __future__ import annotations

import math
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MusicsteerError, UsageError
from .model.config import FRAME_RATE
from .model.loading.load import LoadedModel
from .steering.pack import ConceptPack

OSC_PREFIX = "/musicsteer/"
DTYPES = ("float32", "float16", "bfloat16")
NULL_MODES = ("realtime", "fast")


class StreamError(MusicsteerError):
    """A live stream stopped on an error in the producer (the message says which)."""


# -- models and packs -----------------------------------------------------------------------

def load_model(spec: str, *, device: str = "auto", dtype: str = "float32", weights: str = "full",
               text_encoder: str | Path | None = None, codec: str | Path | None = None,
               kv_cache: str = "auto") -> LoadedModel:
    """A model for `spec`, as `--model` takes it: a preset with random weights (`tiny`, `small`,
    `medium`, `large`), a transformers or audiocraft directory, or a Hugging Face repo id from
    the local cache (never the network). `device` is cpu, cuda, cuda:N or auto (CUDA when
    present); `dtype` float32, float16 or bfloat16; `weights` full, bf16, int8 or int4 (CPU);
    `kv_cache` auto, float32, bf16 or int8 (CPU: the self-attention caches' storage)."""
    import torch

    from .model.loading.load import load_model as load

    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return load(str(spec), text_encoder=_opt_str(text_encoder), codec=_opt_str(codec),
                device=_device(device), dtype=getattr(torch, dtype), weights=weights, kv_cache=kv_cache)


def make_pack(model: LoadedModel | str, *, random: list[str] | tuple[str, ...] = (),
              vectors: dict[str, np.ndarray] | None = None, seed: int = 0) -> ConceptPack:
    """A concept pack before probes are trained (as `musicsteer concepts make`): concepts with
    seeded random directions, and concepts from given vectors ([hidden] for every layer, or
    [layers, hidden]). `model` is a loaded model or a `--model` spec (only its shape is read).
    Save it with `pack.save(directory)`; train one from features with `train_pack`."""
    from .model.loading.load import model_config

    vectors = dict(vectors or {})
    random = list(random)
    if not random and not vectors:
        raise UsageError("make_pack needs random=[NAME, ...] and/or vectors={NAME: array}")
    clash = set(random) & set(vectors)
    if clash:
        raise UsageError(f"concept {sorted(clash)[0]!r} is given twice")
    if isinstance(model, LoadedModel):
        cfg, model_id = model.cfg, model.model_id
    else:
        cfg, model_id = model_config(str(model)), str(model)
    return ConceptPack.made(cfg, model_id, random, vectors, seed=seed)


# -- offline render ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """A rendered clip: mono float32 audio, the codes it was decoded from, the sample rate."""

    audio: np.ndarray  # (samples,) float32
    codes: np.ndarray  # (codebooks, frames) int64
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.codes.shape[1] / FRAME_RATE

    def write(self, path: str | Path) -> Path:
        """Write the audio as a 16-bit WAV (clipped to [-1, 1])."""
        from .render import write_wav

        path = _writable(path)
        write_wav(path, self.audio, self.sample_rate)
        return path


def render_clip(model: LoadedModel | str, prompt: str, seconds: float, *, out: str | Path | None = None,
                seed: int = 0, cfg: float = 3.0, temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0,
                greedy: bool = False, concepts: ConceptPack | str | Path | None = None,
                steer: dict[str, float] | None = None, schedules: dict[str, str] | None = None,
                steering: dict | None = None, progress: bool = False) -> Clip:
    """Generate `seconds` of audio for `prompt` offline, as `musicsteer render` does (the same
    seed gives the same codes). `concepts` is a pack or its directory; `steer` maps concept
    names to strengths, `schedules` to schedule specs (`linear-up:4s`, `decay:0.99`, ...);
    `steering` holds SteeringSettings fields (mode, rows, point, layers, kappa, gate).
    With `out`, the WAV is written there too."""
    from .render import frames_for, synthesize
    from .steering.build import make_steering

    sampling = _sampling(seed, cfg, temperature, top_k, top_p, greedy)
    settings = _steering(steering, seed)
    steer, schedules = _strengths(steer), _schedules(schedules)
    _prompt(prompt)
    _seconds(seconds, "seconds")
    _needs_pack(concepts, steer, schedules)
    out = _writable(out) if out is not None else None
    loaded = _model(model)  # last: a bad argument fails before a model is loaded
    frames = frames_for(seconds, loaded)
    with _pack_dir(concepts) as pack_dir:  # the plan holds the directions once built
        steered = make_steering(loaded, pack_dir, steer, schedules, settings, sampling.batch)
    result, audio = synthesize(loaded, prompt, frames, sampling, steered, progress)
    clip = Clip(audio, result.codes.cpu().numpy().astype(np.int64), loaded.codec.sample_rate)
    if out is not None:
        clip.write(out)
    return clip


# -- live -----------------------------------------------------------------------------------

def start_live(model: LoadedModel | str, prompt: str, *, out: str | Path | None = None, null: str | None = None,
               device: str | None = None, seconds: float | None = None, record: str | Path | None = None,
               seed: int = 0, cfg: float = 3.0, temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0,
               greedy: bool = False, concepts: ConceptPack | str | Path | None = None,
               steer: dict[str, float] | None = None, schedules: dict[str, str] | None = None,
               steering: dict | None = None, buffer_ms: float = 60.0, window: float | None = None,
               keep: float | None = None,
               osc_port: int | None = None, osc_host: str = "127.0.0.1", mapping: str | Path | None = None,
               midi_in: str | None = None, status: bool = False) -> "LiveSession":
    """Start a live session in the background, as `musicsteer live` does, and return its handle
    once playback has started. It plays into the audio device (`device`, or the default one),
    a WAV file at real-time pace (`out`), or nowhere (`null="realtime"` or `"fast"`), until
    `seconds` of audio (None: until stopped). `window` and `keep` (seconds of context, and of
    it kept at a re-prime) default to 30 and 10 on a GPU, 15 and 5 on the CPU. `osc_port` also
    opens the OSC server (0: any free port), `mapping`/`midi_in` MIDI input. Use the handle as a context manager, or call
    `stop()`."""
    from .live.session import LiveRequest, start_session

    chosen = [name for name, v in (("out", out), ("null", null), ("device", device)) if v is not None]
    if len(chosen) > 1:
        raise UsageError(f"give one of out, null and device, not {' and '.join(chosen)}")
    if null is not None and null not in NULL_MODES:
        raise UsageError(f"null={null!r}; use 'realtime' (paced like a sound card) or 'fast'")
    if seconds is not None:
        _seconds(seconds, "seconds")
    for name, value in (("buffer_ms", buffer_ms), ("window", window), ("keep", keep)):
        if value is not None:
            _seconds(value, name)
    if record is not None and isinstance(concepts, ConceptPack):
        raise UsageError("a recorded session names its pack's directory so that it can be replayed: "
                         "save the pack (pack.save(DIR)) and pass concepts=DIR")
    _prompt(prompt)
    steer, schedules = _strengths(steer), _schedules(schedules)
    _needs_pack(concepts, steer, schedules)
    request_args = dict(
        prompt=prompt, sampling=_sampling(seed, cfg, temperature, top_k, top_p, greedy),
        out=_writable(out) if out is not None else None, null=null, device=device, seconds=seconds,
        record=Path(record) if record is not None else None, steer=steer,
        schedules=schedules, steering=_steering(steering, seed), buffer_ms=float(buffer_ms),
        osc_port=osc_port, osc_host=osc_host, mapping=Path(mapping) if mapping is not None else None,
        midi_in=midi_in, status=status)
    loaded = _model(model)  # last: a bad argument fails before a model is loaded
    from .live.window import default_window

    request_args["window_s"], request_args["keep_s"] = default_window(
        loaded.decoder.embed.weight.device.type, None if window is None else float(window),
        None if keep is None else float(keep))
    stop = threading.Event()
    with _pack_dir(concepts) as pack_dir:  # read while the session is built; not needed after
        request = LiveRequest(concepts=pack_dir, **request_args)
        try:
            parts = start_session(loaded, request, stop=stop)
        except ValueError as exc:  # stream settings this model cannot hold (window, keep)
            raise UsageError(str(exc)) from exc
    return LiveSession(parts, stop)


class LiveSession:
    """A running live session (made by `start_live`). The setters take the parameters OSC
    takes, by the same paths: `concept/<name>/strength`, `concept/<name>/schedule`, `prompt`,
    `cfg`, `temperature`, `topk`, `topp` (a leading `/musicsteer/` is accepted too)."""

    def __init__(self, parts, stop: threading.Event) -> None:
        self._parts = parts
        self._stop = stop
        self._result = None

    # -- any thread ---------------------------------------------------------------------------

    @property
    def concepts(self) -> list[str]:
        """The concepts of the session's pack, in pack order (empty without one)."""
        return list(self._parts.plan.names) if self._parts.plan is not None else []

    @property
    def running(self) -> bool:
        """True while the producer generates (False after the time limit, an error or stop)."""
        return self._parts.producer.running

    def set(self, param: str, value, *, smooth_ms: float = 0.0) -> None:
        """Set a parameter's target from the next step, moving there over `smooth_ms` (one-pole).
        Raises a MusicsteerError for an unknown parameter or concept or a value of the wrong type;
        out-of-range numbers are clamped, as over OSC."""
        if self._result is not None:
            raise UsageError("the live session has stopped")
        self._parts.controls.set(_param(param), value, source="api", smooth_ms=smooth_ms)

    def prompt(self, text: str) -> None:
        """A new text prompt, from the next step."""
        self.set("prompt", text)

    def get(self, param: str):
        """The newest target of a parameter (its starting value until something sets it)."""
        return self._parts.controls.current(_param(param))

    def stats(self):
        """A snapshot of the stream: steps, frames, audio seconds, step ms (last, p50, max),
        real-time factor, buffer fill, underruns, re-primes, running, error."""
        return self._parts.producer.stats()

    # -- the thread that started the session ------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stream ends by itself (its `seconds` played, or an error); True if it
        has, False on `timeout`. A session without `seconds` only ends by `stop`."""
        self._parts.producer.join(timeout)
        return not self._parts.producer.running

    def stop(self):
        """Stop and clean up (idempotent) and return the LiveResult (stats, frames played, time
        to first audio). A stream that already ended by itself plays out what is buffered
        first. Raises StreamError if the stream had stopped on an error."""
        if self._result is None:
            self._stop.set()
            self._result = self._parts.finish(drain=not self._parts.producer.running)
            if self._result.stats.error:
                raise StreamError(f"the live stream stopped: {self._result.stats.error}")
        return self._result

    def __enter__(self) -> "LiveSession":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.stop()
        else:  # the block's own error is the one to see; cleanup still happens
            try:
                self.stop()
            except StreamError:
                pass  # the block's exception propagates; the stream's error is in stats()


# -- arguments ------------------------------------------------------------------------------

def _model(model) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model))
    raise UsageError(f"model must be a loaded model (load_model) or a --model spec, got {type(model).__name__}")


def _device(name: str):
    from .backends.select import resolve_device

    return resolve_device(name, "device")


def _sampling(seed, cfg, temperature, top_k, top_p, greedy):
    from .model.sampling import SamplingSettings

    try:
        return SamplingSettings(cfg=float(cfg), temperature=float(temperature), top_k=int(top_k),
                                top_p=float(top_p), greedy=bool(greedy), seed=int(seed))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"sampling settings: {exc}") from exc


def _steering(steering, seed: int):
    from .steering.plan import SteeringSettings

    if steering is None:
        return SteeringSettings(seed=int(seed))
    if isinstance(steering, SteeringSettings):
        return steering
    if not isinstance(steering, dict):
        raise UsageError(f"steering must be a dict of SteeringSettings fields, got {type(steering).__name__}")
    try:
        return SteeringSettings(**{"seed": int(seed), **steering})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"steering settings: {exc}") from exc


def _strengths(steer) -> dict[str, float]:
    out = {}
    for name, value in (steer or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"steer[{name!r}] = {value!r}: a strength is a finite number")
        out[str(name)] = float(value)
    return out


def _schedules(schedules) -> dict[str, str]:
    for name, spec in (schedules or {}).items():
        if not isinstance(spec, str):
            raise UsageError(f"schedules[{name!r}] = {spec!r}: a schedule is a spec string such as linear-up:4s")
    return dict(schedules or {})


def _needs_pack(concepts, steer: dict, schedules: dict) -> None:
    if concepts is None and (steer or schedules):
        raise UsageError("steer and schedules need a concept pack: pass concepts=PACK (a ConceptPack or its "
                         "directory; make_pack makes one)")


def _prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt must be a non-empty string")


def _seconds(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise UsageError(f"{name} must be a positive number, got {value!r}")


def _writable(path) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def _param(param: str) -> str:
    if not isinstance(param, str):
        raise UsageError(f"a parameter is a path such as concept/NAME/strength or cfg, got {param!r}")
    return param[len(OSC_PREFIX):] if param.startswith(OSC_PREFIX) else param


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


@contextmanager
def _pack_dir(concepts):
    """The directory of `concepts` (a pack is written to a temporary one), or None."""
    if concepts is None or isinstance(concepts, (str, Path)):
        yield Path(concepts) if concepts is not None else None
        return
    if not isinstance(concepts, ConceptPack):
        raise UsageError(f"concepts must be a ConceptPack or its directory, got {type(concepts).__name__}")
    with tempfile.TemporaryDirectory(prefix="musicsteer-pack-") as tmp:
        concepts.save(Path(tmp))
        yield Path(tmp)
