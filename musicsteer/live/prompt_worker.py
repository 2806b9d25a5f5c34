"""Threading model: `PromptWorker` owns one thread (`musicsteer-prompts`), run at the lowest CPU
priority the system gives a thread, which encodes prompt texts (T5) and builds their
cross-attention keys and values (`MusicGen.build_memory`) into buffers it owns. It reads the text
encoder's and the decoder's weights, never the caches a forward reads, and writes only its own
buffers until it hands them over. The producer thread calls `submit` and `recycle` (queue puts
under a short lock) and `poll` (a non-blocking take of what is built); none of them waits on the
worker. `build_now` builds on the calling thread, with the same code: for the start of a stream
and for replay, where the producer must install a prompt at a given step. `wait` (tests) blocks
until the worker has built a request. `ProcessPromptWorker` (prompt_process.py) is the same worker
with its builds in a child process.

The prompt worker: prompt changes off the producer thread.

A new prompt used to cost the producer one step of 90-180 ms on the 2-core machine (the T5
encoder, then every layer's keys and values). Here the producer only queues the text; the
worker builds the new memory beside the decoding, and the producer swaps it into its prompt
slot at the start of a step (`MusicGen.install_memory`: a pointer swap per layer on CPU, a
queued copy into the captured buffers under a CUDA graph). Until then the old prompt plays.
Requests for a slot that a newer one replaces before the worker starts on it are dropped.

On CUDA the worker queues its kernels on the same (default) stream as the producer, so a
built memory is complete, in stream order, before any copy or step that reads it, and a
recycled buffer is rewritten only after the copy that read it.

It knows the decoder's prompt-building methods and the text encoder, not the stream, the
controls or the audio.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..model.text import condition_rows

log = logging.getLogger("musicsteer.stream")

NICE = 19  # the worker's CPU priority on POSIX systems: it takes the cores only when the producer leaves them


@dataclass(frozen=True)
class PromptRequest:
    serial: int  # increasing per worker
    slot: int  # prompt slot, from 0
    text: str
    tag: object = None  # what the caller wants back with the built prompt (the control change)


@dataclass(frozen=True)
class BuiltPrompt:
    request: PromptRequest
    buffers: list  # one (keys, values) pair per decoder layer, slot-shaped
    length: int  # text positions
    build_ms: float  # encoding and building, wall time on the worker


class PromptError(RuntimeError):
    pass


class PromptWorker:
    kind = "thread"
    starts_with_audio = False  # the producer starts it at its set-up (a process: with the first audio)

    def __init__(self, text_encoder, decoder, batch: int = 2) -> None:
        self.text, self.decoder, self.batch = text_encoder, decoder, batch
        self.build_threads = self.threads()  # torch threads a build runs on (recorded, for replay)
        self._lock = threading.Condition()
        self._pending: dict[int, PromptRequest] = {}  # slot -> newest request not yet started
        self._built: list[BuiltPrompt] = []
        self._failed: dict[int, str] = {}  # serial -> error, for `wait`
        self._refused: list[tuple[PromptRequest, str]] = []  # failures not yet taken by `refusals`
        self._pool: list[list] = []  # buffer sets handed back, to build into
        self._serial = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.built = self.dropped = self.errors = 0
        self.last_build_ms = 0.0
        self._busy = 0  # 1 while a request is being built

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> "PromptWorker":
        self._thread = threading.Thread(target=self._run, name="musicsteer-prompts", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Requests queued or being built."""
        return len(self._pending) + self._busy

    # -- the producer thread ---------------------------------------------------------------------

    def submit(self, slot: int, text: str, tag: object = None) -> int:
        """Queue `text` for prompt slot `slot`; returns the request's serial (never blocks)."""
        with self._lock:
            self._serial += 1
            replaced = self._pending.get(slot)
            if replaced is not None:
                self.dropped += 1
            self._pending[slot] = PromptRequest(self._serial, slot, text, tag)
            self._lock.notify_all()
            return self._serial

    def poll(self) -> list[BuiltPrompt]:
        """What is built since the last call, oldest first (never blocks)."""
        if not self._built:  # a racy peek is fine: a prompt missed now is taken next step
            return []
        with self._lock:
            built, self._built = self._built, []
        return built

    def refusals(self) -> list[tuple[PromptRequest, str]]:
        """The requests that failed since the last call, with why (never blocks)."""
        if not self._refused:
            return []
        with self._lock:
            refused, self._refused = self._refused, []
        return refused

    def recycle(self, buffers: list) -> None:
        """Buffers a slot held before an install, to build the next prompt into."""
        with self._lock:
            self._pool.append(buffers)

    def build_now(self, slot: int, text: str, tag: object = None) -> BuiltPrompt:
        """Build a prompt on the calling thread (the start of a stream, replay): the same code as the
        worker's, into recycled buffers when there are some, on `build_threads` torch threads, as
        the worker builds (a product split over more threads rounds differently: replay must build
        the bits the live session built, and takes the count from its recording)."""
        with self._lock:
            self._serial += 1
            request = PromptRequest(self._serial, slot, text, tag)
            buffers = self._pool.pop() if self._pool else None
        with torch.inference_mode(), torch_threads(self.build_threads):
            built = build_prompt(self.text, self.decoder, self.batch, request, buffers)
        self.last_build_ms = built.build_ms
        return built

    def wait(self, serial: int, timeout: float = 120.0) -> BuiltPrompt:
        """Block until request `serial` is built by the worker; PromptError if it failed, was
        replaced by a newer request for its slot, or took longer than `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, built in enumerate(self._built):
                    if built.request.serial == serial:
                        return self._built.pop(i)
                if serial in self._failed:
                    raise PromptError(self._failed.pop(serial))
                if self._thread is None or not self._thread.is_alive():
                    raise PromptError("the prompt worker is not running")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PromptError(f"prompt {serial} was not built within {timeout:g} s")
                self._lock.wait(min(left, 0.1))

    # -- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        self._started()
        with torch.inference_mode():  # as the producer's: the buffers pass between the two
            while True:
                with self._lock:
                    while not self._pending and not self._stop:
                        self._lock.wait()
                    if self._stop:
                        return
                    request = min(self._pending.values(), key=lambda r: r.serial)
                    del self._pending[request.slot]
                    self._busy = 1
                try:
                    built = self._build(request)
                except Exception as exc:  # a bad prompt is reported, the worker goes on
                    if self._stop:  # a build cut short by `stop`
                        return
                    self.errors += 1
                    log.error("prompt for slot %d refused: %s", request.slot + 1, exc)
                    with self._lock:
                        message = f"{type(exc).__name__}: {exc}"
                        self._failed[request.serial] = message
                        self._refused.append((request, message))
                        self._busy = 0
                        self._lock.notify_all()
                    continue
                with self._lock:
                    self._built.append(built)
                    self._busy = 0
                    self.built += 1
                    self._lock.notify_all()

    @staticmethod
    def threads() -> int:
        """The torch threads this kind of worker builds on: the thread shares the process's."""
        return torch.get_num_threads()

    def _started(self) -> None:
        """First thing on the worker's thread."""
        lower_priority()

    def _build(self, request: PromptRequest) -> BuiltPrompt:
        """Build `request` (on the worker's thread), into recycled buffers when there are some."""
        with self._lock:
            buffers = self._pool.pop() if self._pool else None
        built = build_prompt(self.text, self.decoder, self.batch, request, buffers)
        self.last_build_ms = built.build_ms
        log.debug("prompt for slot %d built in %.1f ms: %r", request.slot + 1, built.build_ms, request.text)
        return built


def build_prompt(text_encoder, builder, batch: int, request: PromptRequest, buffers: list | None) -> BuiltPrompt:
    """Encode a request's text and build its memory with `builder` (the decoder, or its
    `PromptMemory`): the one code of every worker, thread or process, and of `build_now`."""
    t0 = time.perf_counter()
    states, mask = text_encoder.encode(request.text)
    text, rows = condition_rows(states, mask, batch)
    pairs = builder.build_memory(text, rows, buffers)
    return BuiltPrompt(request, pairs, text.shape[1], (time.perf_counter() - t0) * 1e3)


@contextmanager
def torch_threads(n: int):
    """Torch's products on `n` threads for the duration (the setting is the process's: only for a
    thread that has the process's torch work to itself meanwhile, as the producer at a build_now)."""
    threads = torch.get_num_threads()
    if threads == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lower_priority() -> None:
    """The calling thread at the lowest CPU priority (Linux: nice is per thread; threads it starts,
    such as an OpenMP team, inherit it). Where the system has no such call, it stays as it is."""
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS would take the whole process down
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError as exc:
        log.info("prompt worker keeps its CPU priority: %s", exc)
