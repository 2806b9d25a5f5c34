"""The prompt worker's child process (prompt_process.py starts it): one thread, at the lowest CPU
priority, with one torch/OpenMP thread, so it runs on what the producer's process leaves and
never holds the producer's GIL.

It lowers its priority and its thread count before it imports torch (this module imports
nothing heavy at the top), then takes the text encoder and the decoder's `PromptMemory` from
the pipe (their tensors arrive as shared memory: the parent's own weights, not copies) and
answers one request at a time:

- ("build", request, set_id, block or None) -> ("built", serial, set_id, block or None, length,
  build_ms), or ("failed", serial, message, set_id, block or None) when the prompt is refused.
  A buffer set is one shared tensor (layers, 2, B, H, max_text, hd); the parent names the set to
  build into and sends its tensor the first time this child sees it; None is a new set, which
  the child allocates in shared memory and returns once.
- ("stop",), or the pipe closing (the parent went away): the child exits.

Ctrl-C reaches the whole process group; the child ignores it and leaves its end to the parent.
It knows the prompt-building code (prompt_worker.build_prompt), not the stream.
"""

from __future__ import annotations

import os
import signal

NICE = 19


def main(conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(NICE)
    except OSError:  # the system refuses: the child keeps its priority and still runs
        pass
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # before torch starts its pools
    import torch

    torch.set_num_threads(1)
    from .prompt_worker import build_prompt

    try:
        _, text_encoder, builder, batch = conn.recv()
    except (EOFError, OSError):
        return
    conn.send(("ready", os.getpid(), torch.get_num_threads()))
    sets: dict[int, list] = {}
    with torch.inference_mode():
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent closed its end or died
                return
            if message[0] == "stop":
                return
            _, request, set_id, block = message
            fresh = None
            if block is not None:
                sets[set_id] = pairs(block)
            elif set_id not in sets:
                fresh = allocate(builder)
                sets[set_id] = pairs(fresh)
            try:
                built = build_prompt(text_encoder, builder, batch, request, sets[set_id])
                reply = ("built", request.serial, set_id, fresh, built.length, built.build_ms)
            except Exception as exc:  # refused (too long, ...): said, and the child goes on
                reply = ("failed", request.serial, f"{type(exc).__name__}: {exc}", set_id, fresh)
            try:
                conn.send(reply)
            except OSError:  # the parent stopped (or died) while this prompt was building: nothing to tell
                return


def allocate(builder):
    """A new buffer set in shared memory: (layers, 2, B, H, max_text, hd), written whole by a build."""
    import torch

    with torch.inference_mode(False):  # a plain tensor: the parent's forwards read it as their own
        return torch.empty((len(builder.wkv), 2, *builder.shape), dtype=builder.dtype).share_memory_()


def pairs(block) -> list:
    """A buffer set's (keys, values) views, one pair per layer."""
    return [(block[i, 0], block[i, 1]) for i in range(block.shape[0])]
