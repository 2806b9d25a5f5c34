"""Threading model: the calling (controlling) thread builds everything in
`start_session`, which starts the producer and the sink and returns; `run_live` then
only watches: it prints status, and on a stop request (Ctrl-C, SIGTERM, the time
limit) `LiveParts.finish` stops the producer, lets the sink play what is buffered,
stops the sink and closes the recording, in that order. A caller that does not block
(the Python API's LiveSession) calls `finish` itself, from the same thread.

`musicsteer live` and `render --replay`: assemble a stream (model, ring buffer,
producer, sink, controls, recorder), run it with a one-line status display, and
shut it down cleanly in every state.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..codec.stream import StreamingCodecSettings
from ..controllers import params
from ..controllers.state import ControlState, ScriptedControls
from ..errors import UsageError
from ..model.config import FRAME_RATE
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from ..render import write_wav
from ..steering.build import make_steering
from ..steering.plan import SteeringSettings
from .producer import Producer, StepObserver, StreamConfig, StreamStats
from .prompt_process import build_threads, choose
from .recorder import SessionRecorder, load_session
from .ring_buffer import AudioRing
from .sinks import NullSink, PacedSink, WavSink


@dataclass(frozen=True)
class LiveRequest:
    prompt: str
    sampling: SamplingSettings
    out: Path | None = None  # play into a WAV file at real-time pace
    null: str | None = None  # "realtime" or "fast": play nowhere
    device: str | None = None  # PortAudio output device (None: the default one)
    seconds: float | None = None
    record: Path | None = None
    concepts: Path | None = None
    steer: dict[str, float] = field(default_factory=dict)
    schedules: dict[str, str] = field(default_factory=dict)
    steering: SteeringSettings = SteeringSettings()
    buffer_ms: float = 60.0
    osc_port: int | None = None  # None: no OSC
    osc_host: str = "127.0.0.1"
    osc_smooth_ms: float = 0.0
    mapping: Path | None = None  # MIDI mapping file
    midi_in: str | None = None  # MIDI input to follow
    midi_api: str = "auto"  # the MIDI system (controllers/midi.py API_NAMES)
    scenes: Path | None = None  # scenes file (controllers/scenes.py); None: scenes live in memory
    web_port: int | None = None  # None: no web surface
    web_host: str = "127.0.0.1"
    window_s: float = 30.0
    keep_s: float = 10.0
    reprime_chunk: int = 32  # positions re-primed per step (StreamConfig.reprime_chunk)
    reprime_budget_ms: float | None = None  # or the slice a step's time budget allows (StreamConfig)
    codec: StreamingCodecSettings = field(default_factory=StreamingCodecSettings)
    status: bool = True
    prompt_slots: int = 4  # prompts held at once, for prompt/<n> and the morph (live --prompt-slots)
    prompts: tuple[str, ...] = ()  # slots 2.. at the start (else the mapping file's prompts)
    prompt_worker: str = "auto"  # where prompt changes are built (StreamConfig.prompt_worker)


@dataclass(frozen=True)
class LiveResult:
    stats: StreamStats
    frames_played: int
    first_audio_s: float | None  # from start to the first audio in the ring


def buffer_plan(buffer_ms: float, sample_rate: int, chunk_frames: int, hop: int) -> tuple[int, int, AudioRing]:
    """(fill target, prebuffer, ring) for `buffer_ms` of audio ahead of playback.

    The producer keeps at most the fill target in the ring (at least one codec chunk and
    one block); playback starts once the ring holds the prebuffer, which the producer
    always reaches; the ring itself is twice the target, rounded up to a power of two."""
    chunk = chunk_frames * hop
    target = max(int(buffer_ms * sample_rate / 1000), chunk + hop)
    prebuffer = max(target - chunk, hop)
    need = 2 * target + chunk
    return target, prebuffer, AudioRing(1 << (need - 1).bit_length())


def make_sink(request: LiveRequest, sample_rate: int):
    if request.out is not None:
        if not request.out.parent.exists():
            raise UsageError(f"cannot write {request.out}: directory {request.out.parent} does not exist")
        return WavSink(request.out, sample_rate)
    if request.null is not None:
        return NullSink(sample_rate, realtime=request.null == "realtime")
    from .portaudio_sink import PortAudioSink

    return PortAudioSink(request.device, sample_rate=sample_rate)


def session_info(model: LoadedModel, request: LiveRequest) -> dict:
    return {
        "engine": "musicsteer", "version": __version__, "model": model.model_id, "format": model.format,
        "prompt": request.prompt, "seed": request.sampling.seed, "sampling": asdict(request.sampling),
        "concepts": str(request.concepts) if request.concepts else None, "steer": request.steer,
        "schedules": request.schedules, "steering": asdict(request.steering),
        "stream": {"window_s": request.window_s, "keep_s": request.keep_s, "reprime_chunk": request.reprime_chunk,
                   "reprime_budget_ms": request.reprime_budget_ms, "codec": asdict(request.codec)},
        "prompt_slots": request.prompt_slots, "prompts": list(request.prompts),
        "prompt_threads": build_threads(choose(request.prompt_worker, model.decoder.embed.weight.device)),
        "sample_rate": model.codec.sample_rate, "frame_rate": FRAME_RATE,
    }


def run_live(model: LoadedModel, request: LiveRequest, controls: ControlState | None = None,
             stop: threading.Event | None = None, step_hook=None, on_start=None, on_sink=None,
             observers: list[StepObserver] = ()) -> LiveResult:
    """Run a live session until `stop`, the time limit or a producer error. `on_start(producer)`
    is called once the producer runs, `on_sink(sink)` once playback starts, `observers` are the
    producer's from its first step (benchmarks watch them)."""
    stop = stop or threading.Event()
    session = start_session(model, request, controls, stop, step_hook, on_start, on_sink, observers)
    drain = False
    try:
        last_status = 0.0
        while not stop.is_set() and session.producer.running:
            time.sleep(0.02)
            if request.status and time.monotonic() - last_status > 0.25:
                print_status(session.producer.stats())
                last_status = time.monotonic()
        drain = not stop.is_set()  # ended by the time limit: play out what is buffered
    finally:
        result = session.finish(drain)
    return result


@dataclass
class LiveParts:
    """A started session's pieces, as `start_session` leaves them; `finish` shuts them down.
    `start_session` and `finish` run in the controlling thread; the producer and the sink
    run in their own threads, and controllers write to `controls` from theirs."""

    request: LiveRequest
    producer: Producer
    ring: AudioRing
    sink: object
    controls: ControlState
    recorder: SessionRecorder | None
    plan: object | None  # the steering plan; None without a concept pack
    started: float  # time.monotonic() when the producer was built
    osc: object | None = None
    meter: object | None = None
    midi: object | None = None
    scenes: object | None = None  # the SceneBank every controller stores and recalls through
    web: object | None = None
    sink_started: bool = False

    def finish(self, drain: bool) -> LiveResult:
        """Stop the producer; with `drain`, let the sink play what is buffered first; then stop
        OSC, MIDI, meters and the sink and close the recording, in that order."""
        try:
            self.producer.stop()
            if drain and self.sink_started:
                self.sink.drain()
        finally:
            self.producer.stop()
            if self.web is not None:
                self.web.stop()
            if self.osc is not None:
                self.osc.stop()
            if self.midi is not None:
                self.midi.stop()
            if self.meter is not None:
                self.meter.detach()
            if self.sink_started:
                self.sink.stop()
            stats = self.producer.stats()
            if self.request.status:
                print_status(stats, final=True)
            if self.recorder is not None:
                self.recorder.close({"underruns": stats.underruns, "reprimes": stats.reprimes,
                                     "reprime_chunk": stats.reprime_chunk, "error": stats.error})
        first = self.producer.first_audio_at - self.started if self.producer.first_audio_at else None
        return LiveResult(stats, self.sink.stats().frames_played, first)


def start_session(model: LoadedModel, request: LiveRequest, controls: ControlState | None = None,
                  stop: threading.Event | None = None, step_hook=None, on_start=None, on_sink=None,
                  observers: list[StepObserver] = ()) -> LiveParts:
    """Build a live session and start it without waiting for it to end: returns once playback
    has started (or the producer stopped, or `stop` was set while it buffered). If starting
    fails, what was started is shut down before the error propagates."""
    stop = stop or threading.Event()
    sample_rate = model.codec.sample_rate
    steerer, plan = make_steering(model, request.concepts, request.steer, request.schedules, request.steering,
                                  batch=2)
    names = plan.names if plan is not None else []
    if controls is None:
        controls = ControlState(names)
    request = with_mapping_prompts(request, names)
    seed_controls(controls, request, names)
    target, prebuffer, ring = buffer_plan(request.buffer_ms, sample_rate, request.codec.chunk, model.codec.hop)
    config = StreamConfig(prompt=request.prompt, sampling=request.sampling, window_s=request.window_s,
                          keep_s=request.keep_s, reprime_chunk=request.reprime_chunk,
                          reprime_budget_ms=request.reprime_budget_ms, max_seconds=request.seconds,
                          codec=request.codec, fill_target=target, prompt_slots=request.prompt_slots,
                          prompts=request.prompts, prompt_worker=request.prompt_worker)
    sink = make_sink(request, sample_rate)  # fails before anything starts if the device is missing
    recorder = SessionRecorder(request.record, session_info(model, request), model.cfg.codebooks,
                               sample_rate) if request.record else None
    producer = Producer(model, config, ring, controls, (steerer, plan) if plan is not None else None,
                        recorder, step_hook=step_hook, observers=observers)
    parts = LiveParts(request, producer, ring, sink, controls, recorder, plan, time.monotonic())
    try:
        parts.scenes = make_scenes(request, controls)  # a malformed scenes file fails here, before any sound
        parts.midi = start_midi(request, controls, parts.scenes)  # and a malformed mapping
        if plan is not None and (request.osc_port is not None or request.web_port is not None):
            from ..steering.meters import Meter

            parts.meter = Meter(model.decoder, plan.names, steerer.directions, plan.scores).attach()
        if request.osc_port is not None:
            parts.osc = start_osc(request, controls, producer, plan, parts.midi, parts.meter, parts.scenes)
        if request.web_port is not None:
            from .surface import start_web

            parts.web = start_web(request, controls, producer, plan, parts.meter, parts.scenes, sample_rate)
        producer.start()
        if on_start is not None:
            on_start(producer)
        while not stop.is_set() and producer.running and ring.read_available() < prebuffer:
            time.sleep(0.002)
        sink.start(ring, prefill_frames=prebuffer, resume_frames=prebuffer)
        parts.sink_started = True
        if on_sink is not None:
            on_sink(sink)
    except BaseException:
        parts.finish(drain=False)
        raise
    return parts


def seed_controls(controls: ControlState, request: LiveRequest, names: list[str]) -> None:
    """The starting value of every parameter in the table (params.py) that has one, so /get
    answers before anything was set (events, such as schedules, have none)."""
    for param in params.PARAMS:
        if param.event:
            continue
        for concept in names if param.is_pattern else [None]:
            value = starting_value(param, concept, request)
            if value is not None:  # (an empty prompt slot has none)
                controls.seed(param.path(concept), value)


def starting_value(param: params.Param, concept: str | None, request: LiveRequest):
    """A parameter's value when the session starts, from its target: the request's sampling
    settings and prompt, a concept's --steer strength (else the table's default)."""
    if param.target == "sampling":
        return getattr(request.sampling, param.field)
    if param.target == "prompt":
        texts = (request.prompt, *request.prompts)
        return texts[param.slot - 1] if param.slot <= len(texts) else None
    if param.target in ("strength", "weight"):
        return request.steer.get(concept, param.default) if concept is not None else param.default
    raise ValueError(f"{param.name}: no starting value for target {param.target!r}")


def with_mapping_prompts(request: LiveRequest, concepts: list[str]) -> LiveRequest:
    """The request with the mapping file's prompts in slots 2.. (morph targets), unless it names its own."""
    if request.prompts or request.mapping is None:
        return request
    from dataclasses import replace

    from ..controllers.mapping import Mapping

    prompts = Mapping.load(request.mapping, concepts).prompts
    if 1 + len(prompts) > request.prompt_slots:
        raise UsageError(f"{request.mapping}: {len(prompts)} prompts and --prompt need {1 + len(prompts)} "
                         f"prompt slots; the session holds {request.prompt_slots} (--prompt-slots)")
    return replace(request, prompts=tuple(prompts))


def make_scenes(request: LiveRequest, controls: ControlState):
    """The session's SceneBank: the --scenes file's (a store writes it), else one in memory."""
    from ..controllers.scenes import SceneBank

    return SceneBank.load(controls, request.scenes) if request.scenes is not None else SceneBank(controls)


def start_midi(request: LiveRequest, controls: ControlState, scenes=None):
    """The MIDI controller for --map / --midi-in, started; None without either."""
    if request.mapping is None and request.midi_in is None:
        return None
    from ..controllers.mapping import Mapping
    from ..controllers.midi import MidiController

    mapping = Mapping.load(request.mapping, controls.concepts) if request.mapping is not None else Mapping()
    return MidiController(controls, mapping, port=request.midi_in, api=request.midi_api, scenes=scenes).start()


def start_osc(request: LiveRequest, controls: ControlState, producer: Producer, plan, midi=None, meter=None,
              scenes=None):
    """The OSC server, publishing `meter` and the stats every frame while someone listens."""
    from ..controllers.osc import OscRouter, OscServer

    learn = (lambda param: midi.learn(param, request.mapping)) if midi is not None and request.mapping else None
    router = OscRouter(controls, plan.names if plan is not None else [], stats=producer.stats,
                       smooth_ms=request.osc_smooth_ms, learn=learn, scenes=scenes,
                       strengths=plan.mode.strengths if plan is not None else None)
    osc = OscServer(router, request.osc_host, request.osc_port)
    producer.observers.append(MeterPublisher(osc, meter, router))
    osc.start()
    return osc


class MeterPublisher(StepObserver):
    """After every step, the meters and stats to the OSC listeners, while there are any; a change
    that could not take effect (a refused prompt), as an error to the client that sent it."""

    def __init__(self, osc, meter, router) -> None:
        self.osc, self.meter, self.router = osc, meter, router

    def control_refused(self, change, step: int, message: str) -> None:
        self.osc.report_error(change.param, message)

    def step_done(self, step: int) -> None:
        if self.osc.listening:
            self.osc.publish(self.meter.read() if self.meter is not None else {}, self.router.stats_args())


def print_status(st: StreamStats, final: bool = False) -> None:
    line = (f"step {st.step_ms_p50:6.1f} ms (max {st.step_ms_max:6.1f}) | RTF {st.realtime_factor:5.2f} | "
            f"buffer {100 * st.ring_fill:3.0f}% | underruns {st.underruns} | {st.audio_s:7.1f} s"
            f"{' | re-primes ' + str(st.reprimes) if st.reprimes else ''}")
    if st.error:
        line += f" | error: {st.error}"
    if sys.stderr.isatty() and not final:
        print("\r" + line, end="", file=sys.stderr, flush=True)
    elif final:
        print(("\r" if sys.stderr.isatty() else "") + line, file=sys.stderr, flush=True)


# -- replay -----------------------------------------------------------------------------------

class MemoryRecorder:
    """The recorder interface, kept in memory (replay collects tokens and audio this way)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []

    def frame(self, codes) -> None:
        self.frames.append(np.asarray(codes))

    def audio(self, samples) -> None:
        self.chunks.append(np.asarray(samples))

    def control(self, entry) -> None:
        pass

    def close(self, totals=None) -> None:
        pass


def replay(model: LoadedModel, directory: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Re-run a recorded session: (tokens [K, frames], audio, session.json) identical to the recording's."""
    info, entries, recorded = load_session(directory)
    frames = recorded.shape[1]
    if frames == 0:
        raise UsageError(f"{directory}: the session recorded no frames")
    stream = info["stream"]
    request = LiveRequest(
        prompt=info["prompt"], sampling=SamplingSettings(**info["sampling"]), null="fast",
        seconds=frames / FRAME_RATE, concepts=Path(info["concepts"]) if info.get("concepts") else None,
        steer=info.get("steer", {}), schedules=info.get("schedules", {}),
        steering=SteeringSettings(**info["steering"]), window_s=stream["window_s"], keep_s=stream["keep_s"],
        reprime_chunk=info.get("reprime_chunk", stream.get("reprime_chunk", 32)), codec=StreamingCodecSettings(**stream["codec"]), status=False,
        prompt_slots=info.get("prompt_slots", 1), prompts=tuple(info.get("prompts", ())))
    memory = MemoryRecorder()
    steering = make_steering(model, request.concepts, request.steer, request.schedules, request.steering, batch=2)
    config = StreamConfig(prompt=request.prompt, sampling=request.sampling, window_s=request.window_s,
                          keep_s=request.keep_s, reprime_chunk=request.reprime_chunk, max_seconds=request.seconds,
                          codec=request.codec, prompt_slots=request.prompt_slots, prompts=request.prompts,
                          async_prompts=False, prompt_threads=info.get("prompt_threads"))
    ring = AudioRing(1 << 16)
    sink = PacedSink(model.codec.sample_rate, realtime=False)
    producer = Producer(model, config, ring, ScriptedControls(entries),
                        steering if steering[0] is not None else None, memory)
    sink.start(ring)
    try:
        producer.run()  # in this thread: nothing to overlap with
    finally:
        sink.stop()
    if producer.error:
        raise UsageError(f"replay of {directory} failed: {producer.error}")
    tokens = np.stack(memory.frames, axis=1)[:, :frames]
    return tokens, np.concatenate(memory.chunks), info


def write_replay(model: LoadedModel, directory: Path, out: Path | None, save_tokens: Path | None) -> np.ndarray:
    tokens, audio, _ = replay(model, directory)
    if save_tokens is not None:
        np.save(save_tokens, tokens.astype(np.int64))
    if out is not None:
        write_wav(out, audio, model.codec.sample_rate)
    return tokens
