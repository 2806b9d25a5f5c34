"""The prompt worker process (live/prompt_process.py, live/prompt_child.py): memories built in the
child are the bits the producer's thread builds (full and int4 weights), from the parent's own
weights in shared memory; a prompt change through the process reaches the slot and replays to the
same tokens; a child killed mid-build is logged, answered with /musicsteer/error, and replaced
while the music goes on; stop leaves no child process, zombie or not."""

import dataclasses
import logging
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from musicsteer.controllers.state import ControlState
from musicsteer.errors import UsageError
from musicsteer.live.prompt_process import ProcessPromptWorker, choose
from musicsteer.live.prompt_worker import PromptWorker
from musicsteer.live.recorder import load_session
from musicsteer.live.session import LiveRequest, replay, run_live, start_session
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

PROMPT = "warm lofi piano"
SAMPLING = SamplingSettings(seed=5, top_k=50, cfg=10.0)


class SlowText:
    """A text encoder that takes `delay` seconds (in whichever process it runs): time to kill a child
    mid-build."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def encode(self, prompt: str):
        time.sleep(self.delay)
        return self.inner.encode(prompt)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def gone(pid: int) -> bool:
    """No such process, not even a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "X"
    except FileNotFoundError:
        return True


def wait_for(condition, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_auto_is_the_process_on_cpu_and_the_thread_on_cuda_or_for_replay(monkeypatch):
    monkeypatch.delenv("MUSICSTEER_PROMPT_WORKER", raising=False)
    assert choose("auto", torch.device("cpu")) == "process"
    assert choose("auto", torch.device("cuda")) == "thread"
    assert choose("process", torch.device("cpu"), async_prompts=False) == "thread"  # replay builds in place
    monkeypatch.setenv("MUSICSTEER_PROMPT_WORKER", "thread")
    assert choose("auto", torch.device("cpu")) == "thread" and choose("process", torch.device("cpu")) == "process"
    with pytest.raises(ValueError, match="unknown prompt worker 'gpu'"):
        choose("gpu", torch.device("cpu"))
    with pytest.raises(UsageError, match="builds on the CPU"):
        choose("process", torch.device("cuda"))


@pytest.mark.parametrize("weights", ["full", "int4"])
def test_the_childs_memories_are_the_threads_bits_from_the_parents_weights(tiny, weights):
    model = tiny if weights == "full" else load_model("tiny", weights="int4")
    decoder = model.decoder
    decoder.setup_caches(2, max_len=32, max_text=128, prompts=2)
    texts = (PROMPT, "drum and bass with fast breakbeats, deep sub bass, dark atmosphere and a chopped vocal")
    here = PromptWorker(model.text, decoder)
    expected = [here.build_now(0, text) for text in texts]
    worker = ProcessPromptWorker(model.text, decoder).start()
    try:
        built = []
        for text, want in zip(texts, expected):
            got = worker.wait(worker.submit(0, text), timeout=600)
            assert got.length == want.length
            for (wk, wv), (gk, gv) in zip(want.buffers, got.buffers, strict=True):
                assert torch.equal(wk, gk) and torch.equal(wv, gv)
            built.append(got)
            worker.recycle(got.buffers)  # the second build goes into the first one's set
        assert worker.children == 1 and worker.child_pid != os.getpid()
        assert built[0].buffers[0][0].data_ptr() == built[1].buffers[0][0].data_ptr()  # the recycled set
        assert built[1].buffers[0][0].is_shared()
        # the child read these very tensors: moved into shared memory in place, never copied
        assert all(p.is_shared() for p in model.text.model.parameters())
        assert all(t.is_shared() for t in decoder.memory_builder().state_dict().values())
        # and the decoder still computes with them (the packed layers rebound after the move)
        here2 = PromptWorker(model.text, decoder).build_now(0, texts[1])
        assert all(torch.equal(a[0], b[0]) for a, b in zip(here2.buffers, built[1].buffers))
    finally:
        worker.stop()
    assert gone(worker.child_pid)


def test_a_prompt_change_through_the_process_reaches_the_slot_and_replays(tiny, tmp_path):
    controls, held = ControlState([]), []

    def hook(step):
        if step == 20:  # the child starts with the first audio; it may still be importing torch
            controls.set("prompt", "ambient pads, slow and evolving", source="test")
        if step == 21:
            wait_for(lambda: held[0].prompt_worker.pending == 0)

    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=1.0, record=tmp_path / "s", status=False,
                          prompt_worker="process", prompt_slots=2)
    result = run_live(tiny, request, controls=controls, step_hook=hook, on_start=held.append)
    producer = held[0]
    assert result.stats.error is None and producer.prompt_worker.kind == "process"
    assert producer.prompt == "ambient pads, slow and evolving" and producer.prompt_worker.built == 1
    keys = producer.model.decoder.blocks[0].cross_attn.cache.keys[0]
    assert keys.is_shared() and producer.model.decoder.prompt_mix.lengths[0] == 32  # 31 bytes and EOS
    assert gone(producer.prompt_worker.child_pid)
    info, entries, recorded = load_session(tmp_path / "s")
    assert [(e["param"], e["step"]) for e in entries if e["param"] == "prompt"] == [("prompt", 22)]
    assert info["prompt_threads"] == 1  # the child's: replay builds on as many
    tokens, _, _ = replay(tiny, tmp_path / "s")  # built on the producer's thread this time
    assert np.array_equal(tokens, recorded)


def osc_message(address: str, *args) -> bytes:
    builder = OscMessageBuilder(address)
    for a in args:
        builder.add_arg(a)
    return builder.build().dgram


def test_a_child_killed_mid_build_is_reported_and_replaced_while_the_music_goes_on(tiny, caplog):
    caplog.set_level(logging.INFO, logger="musicsteer.stream")
    model = dataclasses.replace(tiny, text=SlowText(tiny.text, 1.0))
    request = LiveRequest(PROMPT, SAMPLING, null="realtime", seconds=None, osc_port=0, status=False,
                          prompt_worker="process", prompt_slots=1)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(20.0)
    parts = start_session(model, request)
    try:
        worker = parts.producer.prompt_worker
        wait_for(lambda: worker.alive and worker.child_pid is not None)
        first = worker.child_pid
        client.sendto(osc_message("/musicsteer/prompt", "fast techno"), ("127.0.0.1", parts.osc.port))
        wait_for(lambda: worker._in_flight)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: worker.errors == 1)
        data, _ = client.recvfrom(65536)
        reply = OscPacket(data).messages[0].message
        assert reply.address == "/musicsteer/error"
        assert "prompt process died (killed by SIGKILL)" in reply.params[0] and "old prompt keeps playing" in reply.params[0]
        assert "prompt for slot 1 refused" in caplog.text
        steps = parts.producer.step
        time.sleep(0.5)
        assert parts.producer.running and parts.producer.step > steps and parts.producer.prompt == PROMPT
        assert gone(first)

        client.sendto(osc_message("/musicsteer/prompt", "solo cello"), ("127.0.0.1", parts.osc.port))
        wait_for(lambda: parts.producer.prompt == "solo cello")  # a new child built it
        assert worker.children == 2 and worker.child_pid != first and not worker.fallback
        second = worker.child_pid
    finally:
        result = parts.finish(drain=False)
        client.close()
    assert result.stats.error is None
    assert gone(second)


def test_stop_leaves_no_child_whether_it_was_up_or_still_starting(tiny):
    decoder = tiny.decoder
    decoder.setup_caches(2, max_len=32, max_text=64, prompts=1)
    worker = ProcessPromptWorker(tiny.text, decoder).start()
    worker.wait(worker.submit(0, PROMPT), timeout=600)
    pid = worker.child_pid
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the process group: the child leaves it to the parent
    time.sleep(0.3)
    assert worker.alive
    worker.stop()
    assert gone(pid) and not worker._thread.is_alive()

    early = ProcessPromptWorker(tiny.text, decoder).start()
    wait_for(lambda: early._child is not None)  # spawned, not yet answering
    child = early._child
    pid = child.pid
    early.stop()
    assert gone(pid) and not early._thread.is_alive()
