"""Threading model: `ProcessPromptWorker` is the prompt worker (prompt_worker.py) with its builds in
a child process. The producer thread calls what it calls on the thread worker (`submit`, `poll`,
`refusals`, `recycle`, `build_now`), none of which waits. The worker's thread (`musicsteer-prompts`)
is a courier: it shares the weights, starts the child, sends it one request at a time over a pipe
and waits for the reply in a read that holds no lock (and not the GIL); it computes nothing. The
child (prompt_child.py) builds into shared buffer sets that no prompt slot holds. `stop` (any
thread) ends the courier, which stops the child; a child that does not stop is terminated.

Prompt changes built in a separate process.

On the 2-core machine the worker thread slowed the producer down even at the lowest priority
(`small`: step p50 80 ms with a prompt every 2 s, against 43 without): T5 in transformers runs
Python between its torch operations, and a preempted low-priority thread that holds the GIL
holds the producer up. Here that work runs in a child process with its own interpreter, at the
lowest priority and with one torch thread.

- The child reads the parent's weights: the text encoder and the decoder's `PromptMemory` (text
  projection, every layer's key/value projection, packed C forms included) are moved into
  shared memory in place (`to_shared_memory`, as `share_memory()`) and pickled to the child,
  which maps them. Nothing
  is reloaded or re-randomised, and the child runs the same code (`build_prompt`), so a memory
  built there is the bits one built on the producer's thread is (tests/test_prompt_process.py).
- The child builds into buffer sets in shared memory (one tensor per set, its per-layer pairs
  views of it); the parent maps each set once. A built prompt reaches the producer as those
  views and is swapped in as a thread-built one is: one pointer swap per layer. A set the
  producer hands back (`recycle`) is the next one built into.
- The child starts in `start`, which the producer calls once its first audio is in the ring,
  so that the first sound does not wait for it (nor share the CPU with it). A child that dies (a crash, a kill) fails the
  request it was building: the failure is logged and reported (`refusals`), the old prompt keeps
  playing, and the next request starts a new child; after `RESTARTS` restarts the prompts are
  built on the courier's thread instead, as the thread worker does.

`choose` picks the worker: the process on CPU devices, the thread on CUDA, where the encoder
runs on the GPU in milliseconds (the thread holds the GIL for little more than kernel launches),
a second process would need its own CUDA context and the built memory would cross processes
through CUDA IPC with its own synchronisation, and a graph-captured step replays with little
Python on the producer's side.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from ..errors import UsageError
from .prompt_child import pairs
from .prompt_worker import BuiltPrompt, PromptError, PromptRequest, PromptWorker, lower_priority

log = logging.getLogger("musicsteer.stream")

KINDS = ("auto", "process", "thread")
ENV = "MUSICSTEER_PROMPT_WORKER"  # what "auto" means, where set
RESTARTS = 2  # children started after the first before the prompts move to the courier's thread
START_TIMEOUT_S = 600.0  # for the child to import torch and transformers at nice 19 (67 s on a loaded 2-core host)
POLL_S = 0.1  # how often the courier, waiting for a reply, checks the child and `stop`


class ChildGone(PromptError):
    pass


def choose(kind: str, device: torch.device, async_prompts: bool = True) -> str:
    """"process" or "thread" for `kind` (KINDS) on `device`; without async prompts (replay) every
    prompt is built on the producer's thread, and no worker process is started. "auto" takes
    $MUSICSTEER_PROMPT_WORKER first where it is set (the test suite runs its many short sessions
    on the thread; the process worker's own tests ask for it by name)."""
    if kind == "auto":
        kind = os.environ.get(ENV, "auto") or "auto"
    if kind not in KINDS:
        raise ValueError(f"unknown prompt worker {kind!r}; use {', '.join(KINDS)}")
    cpu = torch.device(device).type == "cpu"
    if kind == "process" and not cpu:
        raise UsageError("--prompt-worker process builds on the CPU; on a GPU use thread (or auto)")
    if not async_prompts:
        return "thread"
    if kind == "auto":
        return "process" if cpu else "thread"
    return kind


def build_threads(kind: str) -> int:
    """The torch threads prompts are built on by a worker of `kind` ("process" or "thread")."""
    return (ProcessPromptWorker if kind == "process" else PromptWorker).threads()


def make_worker(kind: str, text_encoder, decoder, batch: int = 2) -> PromptWorker:
    return (ProcessPromptWorker if kind == "process" else PromptWorker)(text_encoder, decoder, batch)


class ProcessPromptWorker(PromptWorker):
    kind = "process"
    starts_with_audio = True

    @staticmethod
    def threads() -> int:
        return 1  # the child's (prompt_child.py)

    def __init__(self, text_encoder, decoder, batch: int = 2) -> None:
        super().__init__(text_encoder, decoder, batch)
        self._sets: dict[int, tuple[torch.Tensor, list]] = {}  # set id -> (shared tensor, its pairs)
        self._ids: dict[int, int] = {}  # id() of a set's first key view -> set id (recycle)
        self._free: list[int] = []  # sets no slot holds
        self._known: set[int] = set()  # sets the current child has mapped
        self._child = self._conn = None
        self.children = 0  # started so far
        self.fallback = False  # building on the courier's thread (the child kept dying)
        self.child_pid: int | None = None
        self.ready_s: float | None = None  # the last child's start, to its answer
        self._builder = None  # the decoder's PromptMemory, shared with the children
        self._in_flight = False  # a request is with the child
        self._reaping = threading.Lock()

    # -- the producer thread -------------------------------------------------------------------

    def recycle(self, buffers: list) -> None:
        first = buffers[0][0] if buffers else None
        set_id = self._ids.get(id(first)) if first is not None else None
        if set_id is not None:
            with self._lock:
                self._free.append(set_id)
        elif first is not None and self.fallback:  # built on this process's threads: for the next such build
            super().recycle(buffers)

    # -- any thread ----------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the courier, which stops the child; if the courier does not end soon (stuck sending to
        a child that does not read), the child is terminated, which ends the courier's send."""
        super().stop(min(timeout, 3.0))
        courier = self._thread
        if courier is not None and courier.is_alive() and courier is not threading.current_thread():
            child = self._child
            if child is not None:
                try:
                    child.terminate()
                except ValueError:  # closed meanwhile by the courier
                    pass
            courier.join(timeout)
        self._reap()

    @property
    def alive(self) -> bool:
        child = self._child
        try:
            return child is not None and child.is_alive()
        except ValueError:  # closed meanwhile by a stop on another thread
            return False

    # -- the courier thread --------------------------------------------------------------------

    def _started(self) -> None:
        """Share the weights and start the first child, while the producer sets up."""
        try:
            self._share()
            self._start_child()
        except Exception as exc:  # reported; the first request tries again
            if not self._stop:  # (a session stopped before the child was up is no error)
                log.error("the prompt process did not start: %s", exc)
            self._reap(wait=0.0 if self._stop else 5.0)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self._close_child()

    def _share(self) -> None:
        if self._builder is None:
            builder = self.decoder.memory_builder()
            for module in (self.text.model, builder):
                module._apply(to_shared_memory)  # as Module.share_memory(), with the copy outside the GIL
            self._builder = builder

    def _start_child(self) -> None:
        from torch import multiprocessing

        from . import prompt_child

        t0 = time.monotonic()
        context = multiprocessing.get_context("spawn")
        parent, child_end = context.Pipe()
        child = context.Process(target=prompt_child.main, args=(child_end,), name="musicsteer-prompts",
                                daemon=True)
        child.start()
        child_end.close()
        self._child, self._conn, self._known = child, parent, set()
        self.children += 1
        parent.send(("setup", self.text, self._builder, self.batch))
        reply = self._receive(START_TIMEOUT_S)
        if reply[0] != "ready":
            raise ChildGone(f"the prompt process answered {reply[0]!r} to its set-up")
        self.child_pid, self.ready_s = reply[1], time.monotonic() - t0
        log.info("prompts are built in process %d (nice 19, %d torch thread), ready in %.1f s", reply[1],
                 reply[2], self.ready_s)

    def _receive(self, timeout: float | None = None):
        """The child's next reply; ChildGone if it dies or `timeout` passes, PromptError on `stop`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn, child = self._conn, self._child
        while True:
            try:
                if conn.poll(POLL_S):
                    return conn.recv()
            except (EOFError, OSError):
                pass  # the child's end closed: it is gone, or going
            if self._stop:
                raise PromptError("the prompt worker was stopped")
            if not child.is_alive():
                child.join(1.0)
                raise ChildGone(f"the prompt process died ({describe_exit(child.exitcode)})")
            if deadline is not None and time.monotonic() > deadline:
                raise ChildGone(f"the prompt process did not answer within {timeout:g} s")

    def _build(self, request: PromptRequest) -> BuiltPrompt:
        if self.fallback:
            return super()._build(request)
        if not self.alive:
            self._restart()
            if self.fallback:
                return super()._build(request)
        with self._lock:
            set_id = self._free.pop() if self._free else None
        if set_id is None:
            set_id = max(self._sets, default=-1) + 1
            self._sets[set_id] = None  # reserved: the child allocates it
        held = self._sets[set_id]
        block = held[0] if held is not None and set_id not in self._known else None  # a set this child has not mapped
        self._in_flight = True
        try:
            self._conn.send(("build", request, set_id, block))
            reply = self._receive()
        except ChildGone as exc:
            self._lost(set_id)
            raise ChildGone(f"{exc}; the old prompt keeps playing, the next change starts a new one") from None
        except (BrokenPipeError, EOFError, OSError) as exc:
            self._lost(set_id)
            raise ChildGone(f"the prompt process is gone ({exc}); the old prompt keeps playing") from None
        finally:
            self._in_flight = False
        self._known.add(set_id)
        kind, serial = reply[0], reply[1]
        fresh = reply[3] if kind == "built" else reply[4]
        if fresh is not None:
            views = pairs(fresh)
            self._sets[set_id] = (fresh, views)
            self._ids[id(views[0][0])] = set_id
        if serial != request.serial:
            raise ChildGone(f"the prompt process answered request {serial} for {request.serial}")
        if kind == "failed":
            with self._lock:
                self._free.append(set_id)
            raise PromptError(reply[2])
        length, ms = reply[4], reply[5]
        self.last_build_ms = ms
        log.debug("prompt for slot %d built in process in %.1f ms: %r", request.slot + 1, ms, request.text)
        return BuiltPrompt(request, self._sets[set_id][1], length, ms)

    def _lost(self, set_id: int) -> None:
        """After a child died: the set it was building is free again (no slot holds it), or, if it never
        arrived, forgotten."""
        if self._sets.get(set_id) is None:
            self._sets.pop(set_id, None)
        else:
            with self._lock:
                self._free.append(set_id)
        self._reap()

    def _restart(self) -> None:
        self._reap()
        if self.children > RESTARTS:
            self.fallback = True
            lower_priority()
            log.error("the prompt process died %d times: prompts are built on a thread from now on", self.children)
            return
        log.warning("starting a new prompt process (%d so far)", self.children)
        try:
            self._start_child()
        except Exception:
            self._reap()
            raise

    def _close_child(self) -> None:
        """Ask an idle child to stop (one mid-build is terminated: its work is discarded) and reap it."""
        if self._conn is not None and self.alive and not self._in_flight:
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        self._reap(wait=0.0 if self._in_flight else 5.0)

    def _reap(self, wait: float = 5.0) -> None:
        """Wait `wait` seconds for the child to exit, then terminate, then kill it; join it (no zombie)."""
        with self._reaping:
            child, conn = self._child, self._conn
            self._child = self._conn = None
            if conn is not None:
                conn.close()
            if child is None:
                return
            child.join(wait)
            if child.is_alive():
                child.terminate()
                child.join(2.0)
            if child.is_alive():
                child.kill()
                child.join()
            child.close()


def to_shared_memory(t: torch.Tensor) -> torch.Tensor:
    """`t`'s values in a new shared-memory tensor (`t` itself if it is shared already). What
    `Tensor.share_memory_()` does, but its copy holds the GIL (about 100 ms for T5-base's embedding
    table: a stall of the producer), where `copy_` releases it."""
    if t.is_shared() or t.numel() == 0 or t.device.type != "cpu":
        return t.share_memory_()
    storage = torch.UntypedStorage._new_shared(t.numel() * t.element_size())
    out = torch.empty(0, dtype=t.dtype).set_(storage, 0, t.shape)
    out.copy_(t)
    return out


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
