"""Threading model: `PromptWorker` owns one thread (`musicsteer-prompts`), run at the lowest CPU
priority the system gives a thread, which encodes prompt texts (T5) and builds their
cross-attention keys and values (`MusicGen.build_memory`) into buffers it owns. It reads the text
encoder's and the decoder's weights, never the caches a forward reads, and writes only its own
buffers until it hands them over. The producer thread calls `submit` and `recycle` (queue puts
under a short lock) and `poll` (a non-blocking take of what is built); none of them waits on the
worker. `build_now` builds on the calling thread, with the same code: for the start of a stream
and for replay, where the producer must install a prompt at a given step. `wait` (tests) blocks
until the worker has built a request.

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
    def __init__(self, text_encoder, decoder, batch: int = 2) -> None:
        self.text, self.decoder, self.batch = text_encoder, decoder, batch
        self._lock = threading.Condition()
        self._pending: dict[int, PromptRequest] = {}  # slot -> newest request not yet started
        self._built: list[BuiltPrompt] = []
        self._failed: dict[int, str] = {}  # serial -> error, for `wait`
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

    def recycle(self, buffers: list) -> None:
        """Buffers a slot held before an install, to build the next prompt into."""
        with self._lock:
            self._pool.append(buffers)

    def build_now(self, slot: int, text: str, tag: object = None) -> BuiltPrompt:
        """Build a prompt on the calling thread (the start of a stream, replay): the same code as the
        worker's, into recycled buffers when there are some."""
        with self._lock:
            self._serial += 1
            request = PromptRequest(self._serial, slot, text, tag)
            buffers = self._pool.pop() if self._pool else None
        with torch.inference_mode():
            return self._build(request, buffers)

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
        lower_priority()
        with torch.inference_mode():  # as the producer's: the buffers pass between the two
            while True:
                with self._lock:
                    while not self._pending and not self._stop:
                        self._lock.wait()
                    if self._stop:
                        return
                    request = min(self._pending.values(), key=lambda r: r.serial)
                    del self._pending[request.slot]
                    buffers = self._pool.pop() if self._pool else None
                    self._busy = 1
                try:
                    built = self._build(request, buffers)
                except Exception as exc:  # a bad prompt is reported, the worker goes on
                    self.errors += 1
                    log.error("prompt for slot %d refused: %s", request.slot + 1, exc)
                    with self._lock:
                        self._failed[request.serial] = f"{type(exc).__name__}: {exc}"
                        self._busy = 0
                        self._lock.notify_all()
                    continue
                with self._lock:
                    self._built.append(built)
                    self._busy = 0
                    self.built += 1
                    self._lock.notify_all()

    def _build(self, request: PromptRequest, buffers: list | None) -> BuiltPrompt:
        t0 = time.perf_counter()
        states, mask = self.text.encode(request.text)
        text, rows = condition_rows(states, mask, self.batch)
        pairs = self.decoder.build_memory(text, rows, buffers)
        ms = (time.perf_counter() - t0) * 1e3
        self.last_build_ms = ms
        log.debug("prompt for slot %d built in %.1f ms: %r", request.slot + 1, ms, request.text)
        return BuiltPrompt(request, pairs, text.shape[1], ms)


def lower_priority() -> None:
    """The calling thread at the lowest CPU priority (Linux: nice is per thread; threads it starts,
    such as an OpenMP team, inherit it). Where the system has no such call, it stays as it is."""
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS would take the whole process down
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except OSError as exc:
        log.info("prompt worker keeps its CPU priority: %s", exc)
