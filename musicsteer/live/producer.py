"""Threading model: `Producer` runs `run()` in its own thread and is the only writer
of tokens, caches, the ring buffer and the recorder queue. Other threads call
`pause`, `resume`, `stop` (events) and `stats` (a snapshot built from plain
attributes); controls arrive through the control source's own thread-safe setters.
Observers (`StepObserver`) are called on the producer thread and must not block; add
them before `start()` (and set `timing` before it too, for `step_timed`). Prompts are
built by the prompt worker (prompt_worker.py: a thread; prompt_process.py: a child process
with a courier thread), which the producer starts and stops; the producer only queues texts and
swaps built ones in at the start of a step.

The producer: generation running ahead of playback in its own thread.

Per step it swaps in the prompts the worker has built since the last step (each logged
as a control change at that step, so replay installs it at the same step), takes the
control changes (once), writes the steering strengths, runs
the one decoder step (model/step.py) on the CFG batch, appends the token column to
the window's history (window.py: endless streams, re-primed into a spare cache while
decoding goes on), hands each complete frame to the streaming codec, and pushes the
codec's audio into the ring buffer, waiting only while the ring is full. On the CPU's fused
blocks the codec's decode of a frame runs on thread 0 of the next step while the step's other
threads start it (StreamingCodecSettings.overlap); that audio goes out right after that step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends.select import captures_graphs
from ..codec.stream import StreamingCodecSettings, StreamingDecoder
from ..controllers.state import ControlChange
from ..model.config import FRAME_RATE
from ..model.graph_step import GraphedStep
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings, make_generator
from ..model.step import DecodeStep
from .controls import EngineControls
from .prompt_process import choose, make_worker
from .ring_buffer import AudioRing
from .window import CHUNKS, Window, choose_chunk, fits, reprime_margin

log = logging.getLogger("musicsteer.stream")


@dataclass(frozen=True)
class StreamConfig:
    prompt: str
    sampling: SamplingSettings = SamplingSettings()
    window_s: float = 30.0  # context the model sees at most (MusicGen was trained on 30 s)
    keep_s: float = 10.0  # context kept when the window is re-primed
    reprime_chunk: int = 32  # positions re-primed per step
    # A time budget per step (ms) instead: before the first re-prime, the largest slice that keeps a
    # step within it, from the steps so far and the prefill's cost measured at setup (window.py
    # choose_chunk); `reprime_chunk` when none does. The re-prime's schedule (when the new window
    # starts) follows the slice, so the chosen one is in the stats and the recording, for replay.
    reprime_budget_ms: float | None = None
    max_seconds: float | None = None  # stop after this much audio; None plays until stopped
    fill_target: int | None = None  # samples kept ahead of playback at most; None fills the ring
    codec: StreamingCodecSettings = field(default_factory=StreamingCodecSettings)
    # Each step as the replay of a captured CUDA graph, one per cache set (the re-prime swaps
    # sets); None: on CUDA devices. Off CUDA, True runs the same static step eagerly (tests).
    graph: bool | None = None
    # Prompt slots held at once (blended by the prompt weights); slots 2.. start with `prompts`.
    prompt_slots: int = 1
    prompts: tuple[str, ...] = ()
    # Prompt changes built by the worker while the old prompt plays (live); False: the producer waits
    # for each one at the step it is logged at (replay, which must install it at that step).
    async_prompts: bool = True
    # Where live prompt changes are built (prompt_process.py): "process" (a child process), "thread",
    # or "auto": the process on CPU devices, the thread on CUDA.
    prompt_worker: str = "auto"
    # Torch threads the prompts are built on (None: the worker's own count); replay takes the
    # recorded session's, so that its builds round as the live ones did.
    prompt_threads: int | None = None

    def positions(self, max_positions: int, codebooks: int) -> tuple[int, int]:
        """(window, keep) in positions, within the model's position table."""
        if self.reprime_chunk < 2:
            raise ValueError("reprime_chunk must be at least 2 positions per step")
        window = min(int(self.window_s * FRAME_RATE) + codebooks, max_positions)
        keep = int(self.keep_s * FRAME_RATE)
        if keep < codebooks + 1 or not fits(window, keep, self.reprime_chunk, codebooks):
            raise ValueError(f"a {self.window_s:g} s window that keeps {self.keep_s:g} s leaves no room to re-prime "
                             f"(the model holds {max_positions / FRAME_RATE:.1f} s)")
        return window, keep

    def reprime_margin(self, keep: int) -> int:
        """Steps before the window fills at which re-priming starts: it takes keep/(chunk-1) steps."""
        return reprime_margin(keep, self.reprime_chunk)


@dataclass(frozen=True)
class StepSplit:
    """Where one step's time went, in seconds (perf_counter), for observers that ask (`timing`).
    On CUDA the decoder step is only launched: its time lands where the host next waits for it
    (the frame's copy to the host, counted in `total` but in none of the parts)."""

    position: int  # the cache position the step's input went in at (grows through a window)
    controls: float  # step start to the decoder: observers, control changes, steering plan
    decode: float  # the decoder step, guidance and sampling, the column pushed to the history
    reprime: float  # the window's re-prime slice this step (0 on steps without one)
    reprime_positions: int  # positions that slice ran into the spare cache
    codec: float  # the streaming codec's push of this step's frame (0 before the first frame)
    ring_wait: float  # waiting for room in the ring: pacing, not cost (excluded from total)
    total: float  # the whole step, observers included, ring wait excluded
    # The last frame's decode run on a thread of this step's decoder (StreamingCodecSettings.overlap):
    # inside `decode`, not added to `codec` (which holds what was left of it here: taking its audio).
    codec_hidden: float = 0.0

    @property
    def other(self) -> float:
        return self.total - self.decode - self.reprime - self.codec


@dataclass(frozen=True)
class StreamStats:
    steps: int
    frames: int
    audio_s: float
    step_ms_last: float
    step_ms_p50: float  # over the last few hundred steps
    step_ms_max: float
    realtime_factor: float  # audio seconds per compute second, recent steps
    ring_fill: float  # 0..1
    underruns: int
    reprimes: int
    reprime_chunk: int  # positions re-primed per step (chosen before the first re-prime under a budget)
    running: bool
    error: str | None
    prompts_pending: int = 0  # prompt changes queued or being built
    prompt_build_ms: float = 0.0  # the last prompt's encoding and building, on the worker


class StepObserver:
    """What a producer tells its observers, on the producer thread, in this order per step:
    `step_started`, `control_applied` for each change taken, `before_decode`, `step_computed`
    (the column is pushed: frame step - (K - 1) is complete), `audio_pushed` for audio that step
    put in the ring, `step_done`, and `step_timed` while the producer's `timing` is on. Every
    method is optional; none may block."""

    def step_started(self, step: int) -> None:
        pass

    def control_applied(self, change: ControlChange, step: int) -> None:
        pass

    def control_refused(self, change: ControlChange, step: int, message: str) -> None:
        """A change that could not take effect (a prompt the worker refused or lost), told at `step`."""

    def before_decode(self, step: int) -> None:
        pass

    def step_computed(self, step: int) -> None:
        pass

    def audio_pushed(self, first_sample: int, samples: int, ring_index: int) -> None:
        pass

    def audio_block(self, audio: np.ndarray) -> None:
        """The block just pushed (float32 samples; valid only during the call: copy to keep)."""

    def step_done(self, step: int) -> None:
        pass

    def step_timed(self, step: int, split: StepSplit) -> None:
        pass


class _Calls(StepObserver):
    """Plain callables as an observer: `before_decode(step)` and `step_done(step)`."""

    def __init__(self, before_decode: Callable[[int], None] | None, step_done: Callable[[int], None] | None) -> None:
        if before_decode is not None:
            self.before_decode = before_decode
        if step_done is not None:
            self.step_done = step_done


class ControlSource:
    """What the producer reads controls from: `take(step)` -> changes effective at `step`."""

    def take(self, step: int) -> list[ControlChange]:  # pragma: no cover - protocol
        raise NotImplementedError


class Producer:
    def __init__(self, model: LoadedModel, config: StreamConfig, ring: AudioRing,
                 controls: ControlSource | None = None, steering=None, recorder=None,
                 step_hook: Callable[[int], None] | None = None,
                 on_step: Callable[[int], None] | None = None, observers: list[StepObserver] = ()) -> None:
        """`steering` is (Steerer, SteeringPlan) or None; `observers` are told what each step did
        (meters, benchmark stamps); `step_hook(step)` runs inside every step, before the decoder
        (tests use it to make the producer slow), `on_step(step)` after it: both as an observer."""
        self.model, self.config, self.ring = model, config, ring
        self.controls, self.recorder = controls, recorder
        self.observers: list[StepObserver] = list(observers)
        if step_hook is not None or on_step is not None:
            self.observers.append(_Calls(step_hook, on_step))
        self.steerer, self.plan = steering if steering is not None else (None, None)
        cfg = model.cfg
        self.K, self.special = cfg.codebooks, cfg.special_token
        self.window, self.keep = config.positions(cfg.max_positions, self.K)
        if not 1 + len(config.prompts) <= config.prompt_slots:
            raise ValueError(f"{1 + len(config.prompts)} prompts need as many slots; the stream holds "
                             f"{config.prompt_slots}")
        self.engine = EngineControls(config.sampling, config.prompt, self.plan, self._request_prompt,
                                     model.decoder.set_prompt_weights if config.prompt_slots > 1 else None,
                                     config.prompt_slots)
        kind = choose(config.prompt_worker, model.decoder.embed.weight.device, config.async_prompts)
        self.prompt_worker = make_worker(kind, model.text, model.decoder)
        if config.prompt_threads is not None:
            self.prompt_worker.build_threads = config.prompt_threads
        self._prompt_changes = 0  # prompt swaps since the start (stats)
        self.last_install_ms = 0.0  # the last prompt swap's cost on this thread
        self.last_build_ms = 0.0  # what building that prompt cost (the worker's thread, or this one)
        self.codec_stream = StreamingDecoder(model.codec, self.K, config.codec)
        self._stop, self._paused = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.decode: DecodeStep | None = None  # set up in the producer thread (_setup), with the window
        self.context: Window | None = None
        self._times = np.zeros(256)  # recent step times, seconds (ring of samples)
        self._decode_s = 0.0  # the last codec decode, seconds
        self._codec_s = self._wait_s = 0.0  # this step's codec push and ring wait, seconds
        self._codec_hidden_s = 0.0  # this step's codec decode run beside its decoder step, seconds
        self._overlap = False  # the codec decodes on a decoder step's thread (set up in _setup)
        self._codec_job = None  # the frame's decode queued for the next step's thread 0 (kernels/cpu_codec.py)
        # Each step's StepSplit to the observers (`step_timed`): on when one of them implements it.
        # (ms per slice, ms per position) of the re-prime under a budget: measured at setup, then
        # used once (_choose_chunk) and kept in `slice_cost`
        self._slice_cost: tuple[float, float] | None = None
        self.slice_cost: tuple[float, float] | None = None
        self.timing = any(type(o).step_timed is not StepObserver.step_timed for o in self.observers)
        self.step = 0
        self.frames = 0
        self.error: str | None = None
        self.first_audio_at: float | None = None
        self.audio_pushed = 0  # samples

    # -- control from other threads ----------------------------------------------------------

    def start(self) -> "Producer":
        self._thread = threading.Thread(target=self.run, name="musicsteer-producer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._paused.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings in force (the controls change them step by step)."""
        return self.engine.sampling

    @property
    def prompt(self) -> str:
        return self.engine.prompt

    @property
    def reprimes(self) -> int:
        return self.context.reprimes if self.context is not None else 0

    @property
    def graphs(self) -> dict[int, GraphedStep] | None:
        """The graphed step per cache set, where the stream steps through graphs."""
        return self.decode.graphs if self.decode is not None else None

    def stats(self) -> StreamStats:
        n = min(self.step, len(self._times))
        recent = self._times[:n] if n else np.zeros(1)
        mean = float(recent.mean()) if n else 0.0
        m = self.ring.metrics()
        return StreamStats(
            steps=self.step, frames=self.frames, audio_s=self.audio_pushed / self.model.codec.sample_rate,
            step_ms_last=float(self._times[(self.step - 1) % len(self._times)] * 1e3) if self.step else 0.0,
            step_ms_p50=float(np.median(recent) * 1e3), step_ms_max=float(recent.max() * 1e3),
            realtime_factor=(1.0 / FRAME_RATE) / mean if mean > 0 else 0.0,
            ring_fill=m.fill / m.capacity, underruns=m.underruns, reprimes=self.reprimes,
            reprime_chunk=self.context.chunk if self.context is not None else self.config.reprime_chunk,
            running=self.running, error=self.error, prompts_pending=self.prompt_worker.pending,
            prompt_build_ms=self.prompt_worker.last_build_ms)

    # -- the producer thread -------------------------------------------------------------------

    def run(self) -> None:
        try:
            with torch.inference_mode():
                self._setup()
                while not self._stop.is_set():
                    if self._paused.is_set():
                        time.sleep(0.005)
                        continue
                    if self._limit_reached():
                        break
                    self._wait_for_room()
                    if self._stop.is_set() or self._paused.is_set():
                        continue
                    self._one_step()
                self._finish()
        except Exception as exc:  # the stream ends; the error is reported, never swallowed
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("producer stopped")
        finally:
            self._drop_codec_job()
            self.prompt_worker.stop()
            if self.steerer is not None:
                self.steerer.detach()

    def _limit_reached(self) -> bool:
        limit = self.config.max_seconds
        return limit is not None and self.frames >= round(limit * FRAME_RATE)

    def _setup(self) -> None:
        decoder = self.model.decoder
        device = decoder.embed.weight.device
        self.device = device
        budget = self.config.reprime_budget_ms
        self.context = Window(decoder, self.window, self.keep, self.config.reprime_chunk,
                              self.config.reprime_margin(self.keep),
                              reprime_margin(self.keep, CHUNKS[0]) if budget is not None else None,
                              steering=self._replayed if self.plan is not None else None,
                              prompts=self.config.prompt_slots)
        if self.plan is not None:
            self.plan.keep_history(self.context.retain)
        for slot, text in enumerate((self.config.prompt, *self.config.prompts)):  # built as live ones are
            self._install(self.prompt_worker.build_now(slot, text), None)
        # A worker process starts with the first audio (_push_audio): its start (weights moved into shared
        # memory, an interpreter importing torch) then costs the first sound nothing, and nothing reads
        # those weights here any more. Changes asked for before then wait in its queue.
        if not self.prompt_worker.starts_with_audio:
            self.prompt_worker.start()
        if budget is not None:  # the re-prime's cost, measured here while the spare set is free
            self._slice_cost = self.context.measure_prefill()
        self.codec_stream.warm_up()
        self.generator = make_generator(self.sampling.seed, device)
        self.decode = DecodeStep(decoder, 2)
        if self.steerer is not None:
            self.steerer.attach()
        backend = self.model.backend
        use_graph = self.config.graph
        if use_graph is None:
            use_graph = backend.graphs if backend is not None else captures_graphs(device)
        if use_graph:  # one graph per cache set: the re-prime swaps them (steering attached first)
            self.decode.capture(self.context.cache_sets)
        codec = self.config.codec
        self._overlap = (codec.overlap and codec.threads == 1 and not use_graph and hasattr(self.codec_stream, "begin_push")
                         and getattr(decoder, "fused_stack", None) is not None)

    def _replayed(self, first: int, n: int):
        """The re-prime's steering: columns first..first+n-1 with the strengths their steps used."""
        return self.steerer.replaying(self.plan.recorded(first, n))

    def _request_prompt(self, slot: int, text: str, change: ControlChange | None) -> None:
        """A prompt slot's new text (from the controls, on this thread): to the worker; swapped in at
        the start of a later step, or, for replay, built and swapped in now."""
        if self.config.async_prompts:
            self.prompt_worker.submit(slot, text, change)
        else:
            self._install(self.prompt_worker.build_now(slot, text, change), self.step)

    def _install_ready(self, step: int) -> None:
        """At a step boundary: every prompt built since the last step into its slot, and the refused
        ones to the observers (the old prompt plays on)."""
        for built in self.prompt_worker.poll():
            self._install(built, step)
        for request, message in self.prompt_worker.refusals():
            if request.tag is not None:
                for observer in self.observers:
                    observer.control_refused(request.tag, step, message)

    def _install(self, built, step: int | None) -> None:
        """Swap a built prompt into its slot (O(layers) pointer swaps, or queued copies under a graph),
        hand the old buffers back to the worker, and log the change at `step` (None: the start)."""
        slot, text = built.request.slot, built.request.text
        t0 = time.perf_counter()
        self.prompt_worker.recycle(self.model.decoder.install_memory(slot, built.buffers, built.length))
        self.engine.slot_filled(slot, text)
        self.last_install_ms = (time.perf_counter() - t0) * 1e3
        self.last_build_ms = built.build_ms
        change = built.request.tag
        if step is not None and change is not None:
            self._prompt_changes += 1
            log.info("prompt slot %d: %r from step %d (asked at step %d, built in %.0f ms)", slot + 1, text, step,
                     change.received_step, built.build_ms)
            self._log_change(change, step)

    def _apply_controls(self, step: int) -> None:
        if self.controls is None:
            return
        self.controls.step_now = step
        for change in self.engine.apply(self.controls.take(step), step):
            if self.engine.deferred(change):  # a prompt: logged at the step it is swapped in at
                continue
            self._log_change(change, step)

    def _log_change(self, change: ControlChange, step: int) -> None:
        if self.recorder is not None:
            self.recorder.control(change.to_json(step))
        for observer in self.observers:
            observer.control_applied(change, step)

    def _wait_for_room(self) -> None:
        """Just in time: a step whose frame completes a codec chunk starts only once that chunk's
        audio will fit under the fill target by the time the step and the decode are done. The
        controls the step reads are then the freshest the buffer allows; waiting for room after
        the step instead would hold its audio back, and the next change, by a chunk."""
        target = self.config.fill_target
        if target is None or self.step < self.K - 1 or self.codec_stream.frames_until_decode != 1:
            return
        codec = self.model.codec
        n = min(self.step, len(self._times))
        ahead_s = float(np.median(self._times[:n])) + self._decode_s if n else 0.0
        lead = int(min(ahead_s, target / codec.sample_rate / 2) * codec.sample_rate)  # played meanwhile
        need = self.config.codec.chunk * codec.hop
        while self.ring.read_available() > max(target - need + lead, 0):
            if self._stop.is_set() or self._paused.is_set():
                return
            time.sleep(0.001)

    def _choose_chunk(self) -> None:
        """Under a time budget, once: the slice size, just before the earliest re-prime could start."""
        context = self.context
        if self.step - context.base + reprime_margin(self.keep, CHUNKS[0]) + 1 < self.window:
            return
        n = min(self.step, len(self._times))
        step_ms = (float(np.median(self._times[:n])) + self._decode_s) * 1e3 if n else 0.0
        chunk = choose_chunk(step_ms, self._slice_cost, self.config.reprime_budget_ms, self.window, self.keep,
                             self.K, self.config.reprime_chunk)
        context.set_chunk(chunk)
        log.info("re-prime: %d positions per step (step %.1f ms, slice %.1f + %.2f ms per position, budget %g ms)",
                 chunk, step_ms, *self._slice_cost, self.config.reprime_budget_ms)
        self.slice_cost, self._slice_cost = self._slice_cost, None

    def _one_step(self) -> None:
        if self._slice_cost is not None:
            self._choose_chunk()
        t0 = time.perf_counter()
        s, context, observers = self.step, self.context, self.observers
        self._codec_s = self._wait_s = self._codec_hidden_s = 0.0
        for observer in observers:
            observer.step_started(s)
        self._install_ready(s)
        self._apply_controls(s)
        if self.plan is not None:
            self.plan.write(s, self.steerer)
        for observer in observers:
            observer.before_decode(s)
        t1 = time.perf_counter()
        pos = s - context.base
        token, _ = self.decode(context.column(s), pos, self.sampling, self.generator,
                               self.decode.opening(s))  # (K,): input column s at its window position
        context.push(token)
        self.step += 1
        t2 = time.perf_counter()
        if self._codec_job is not None:
            self._collect_audio()
        t2b = time.perf_counter()
        primed = context.advance(self.step)
        t3 = time.perf_counter()
        self._times[s % len(self._times)] = t3 - t0
        for observer in observers:
            observer.step_computed(s)  # frame s - (K - 1) is complete
        if s >= self.K - 1:
            self._emit_frame(s - (self.K - 1))
        for observer in observers:
            observer.step_done(s)
        if self.timing:  # plain floats until someone asks
            split = StepSplit(pos, t1 - t0, t2 - t1, t3 - t2b, primed, self._codec_s, self._wait_s,
                              time.perf_counter() - t0 - self._wait_s, self._codec_hidden_s)
            for observer in observers:
                observer.step_timed(s, split)

    def _emit_frame(self, f: int) -> None:
        frame = torch.stack([self.context.column(f + 1 + k)[k] for k in range(self.K)]).cpu()  # (K,)
        self.frames += 1
        if self.recorder is not None:
            self.recorder.frame(frame.numpy())
        if self._overlap:
            job = self.codec_stream.begin_push(frame)
            if job is not None:  # decoded on thread 0 of the next step (_collect_audio takes it)
                self._codec_job = job
                self.model.decoder.fused_stack.side = (job.function, job.address)
            return
        t0 = time.perf_counter()
        audio = self.codec_stream.push(frame)
        self._codec_s = time.perf_counter() - t0
        if audio is not None:
            self._decode_s = self._codec_s
            self._push_audio(audio)

    def _collect_audio(self) -> None:
        """The audio of the frame whose decode ran beside this step's decoder step (or runs now, where
        the step took no job: no fused call ran), into the ring."""
        job = self._codec_job
        self._drop_codec_job()
        hidden = job.done
        t0 = time.perf_counter()
        audio = self.codec_stream.end_push(job)
        self._codec_s = time.perf_counter() - t0
        self._codec_hidden_s = job.seconds if hidden else 0.0
        self._decode_s = job.seconds
        if audio is not None:
            self._push_audio(audio)

    def _drop_codec_job(self) -> None:
        """No job left for a decoder call: the C side holds only its address."""
        self._codec_job = None
        stack = getattr(self.model.decoder, "fused_stack", None)
        if stack is not None:
            stack.side = None

    def _push_audio(self, audio: np.ndarray) -> None:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        ring_index = self.ring.metrics().frames_written if self.observers else 0
        limit = max(self.config.fill_target or self.ring.capacity, len(audio))
        # Ahead of playback by the fill target (or the ring is full): wait for the sink.
        t0 = time.perf_counter()
        while self.ring.read_available() + len(audio) > limit or not self.ring.write(audio):
            if self._stop.is_set():
                return
            time.sleep(0.001)
        self._wait_s += time.perf_counter() - t0
        for observer in self.observers:
            observer.audio_pushed(self.audio_pushed, len(audio), ring_index)
            observer.audio_block(audio)
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            if self.prompt_worker.starts_with_audio:
                self.prompt_worker.start()
        self.audio_pushed += len(audio)
        if self.recorder is not None:
            self.recorder.audio(audio)

    def _finish(self) -> None:
        """End of stream: the codec's last frames, decoded without look-ahead."""
        if self._stop.is_set() and not self._limit_reached():
            return
        if self._codec_job is not None:  # the last frame's decode, here
            self._collect_audio()
        tail = self.codec_stream.flush()  # the codec's look-ahead: can be longer than the fill target
        piece = self.config.codec.chunk * self.model.codec.hop
        for i in range(0, len(tail), piece):
            self._push_audio(tail[i : i + piece])
