"""The prompt worker (live/prompt_worker.py) and prompt changes in a live stream: texts are encoded on
the worker's thread while the old prompt plays, swapped in at a step boundary and logged there; a
morph sweep is recorded and replays to the same tokens; a prompt the worker refuses leaves the music
playing; requests for one slot coalesce; pinned (graph-captured) caches are written in place."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from musicsteer.controllers.osc import OscRouter
from musicsteer.controllers.state import ControlState
from musicsteer.live.producer import StepObserver
from musicsteer.live.prompt_worker import PromptError, PromptWorker
from musicsteer.live.recorder import load_session
from musicsteer.live.session import LiveRequest, replay, run_live
from musicsteer.model.musicgen import MusicGen
from musicsteer.model.sampling import SamplingSettings
from musicsteer.model.text import condition_rows

PROMPT = "warm lofi piano"
SAMPLING = SamplingSettings(seed=5, top_k=50, cfg=10.0)  # strong guidance: the tiny preset's prompts are heard


class SlowText:
    """A text encoder that takes `delay` seconds, as T5-base does for a long prompt, and notes the
    thread each encode ran on."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.threads = inner, delay, []

    def encode(self, prompt: str):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return self.inner.encode(prompt)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class StepTimes(StepObserver):
    def __init__(self) -> None:
        self.total: dict[int, float] = {}

    def step_timed(self, step, split) -> None:
        self.total[step] = split.total


def until_built(holder: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while holder["p"].prompt_worker.pending and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_slow_prompt_is_built_off_the_producer_thread_while_the_old_one_plays(tiny, tmp_path):
    slow = SlowText(tiny.text, 0.3)  # 15 frames of encoding: a step doing it would take 300 ms
    model = dataclasses.replace(tiny, text=slow)
    controls, times = ControlState([]), StepTimes()

    def hook(step):
        if step in (20, 70):
            controls.set("prompt", f"fast techno {step}", source="test")

    request = LiveRequest(PROMPT, SAMPLING, null="realtime", seconds=3.0, buffer_ms=60, status=False,
                          record=tmp_path / "s")
    result = run_live(model, request, controls=controls, step_hook=hook, observers=[times])
    assert result.stats.error is None and result.stats.frames == 150
    assert slow.threads[0] != "musicsteer-prompts"  # the first prompt, before any audio
    assert slow.threads[1:] == ["musicsteer-prompts"] * 2
    assert max(times.total.values()) < 0.2  # no step held the 300 ms encode
    _, entries, _ = load_session(tmp_path / "s")
    installed = [(e["received_step"], e["step"], e["value"]) for e in entries if e["param"] == "prompt"]
    assert [(asked, text) for asked, _, text in installed] == [(20, "fast techno 20"), (70, "fast techno 70")]
    assert all(at >= asked + 10 for asked, at, _ in installed)  # the old prompt played meanwhile


def test_a_morph_sweep_is_recorded_and_replays_to_the_same_tokens(tiny, tmp_path):
    controls, holder = ControlState([]), {}

    def hook(step):
        if step == 3:  # a second slot and a weight for it at once: the weight waits for the slot
            controls.set("prompt/2", "ambient pads, slow and evolving", source="test")
            controls.set("prompt/morph", 0.5, source="test")
        if step == 5:
            until_built(holder)
        if 20 <= step <= 70:  # a fader sweep, one value a frame, smoothed as OSC would
            controls.set("prompt/morph", (step - 20) / 50, source="test", smooth_ms=40.0)

    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=2.0, record=tmp_path / "s", status=False)
    run_live(tiny, request, controls=controls, step_hook=hook, on_start=lambda p: holder.update(p=p))
    assert holder["p"].model.decoder.prompt_mix.host == (0.0, 1.0, 0.0, 0.0)  # the sweep ended on slot 2
    info, entries, recorded = load_session(tmp_path / "s")
    assert info["prompt_threads"] == torch.get_num_threads()  # the thread worker's: replay builds on as many
    params = [e["param"] for e in entries]
    assert params.count("prompt/2") == 1 and params.count("prompt/morph") == 52
    tokens, _, _ = replay(tiny, tmp_path / "s")
    assert np.array_equal(tokens, recorded)

    plain = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=2.0, record=tmp_path / "plain", status=False)
    run_live(tiny, plain, controls=ControlState([]))
    assert not np.array_equal(load_session(tmp_path / "plain")[2], recorded)  # the morph was heard


def test_a_prompt_the_worker_refuses_leaves_the_music_playing(tiny, tmp_path, caplog):
    controls, holder = ControlState([]), {}

    def hook(step):
        if step == 10:
            controls.set("prompt", "x" * 300, source="test")  # 301 text tokens: the cache holds 256
        if step == 12:
            until_built(holder)

    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=1.0, record=tmp_path / "s", status=False)
    result = run_live(tiny, request, controls=controls, step_hook=hook, on_start=lambda p: holder.update(p=p))
    assert result.stats.error is None and result.stats.frames == 50
    assert holder["p"].prompt == PROMPT and holder["p"].prompt_worker.errors == 1
    assert "prompt for slot 1 refused" in caplog.text and "text tokens" in caplog.text
    assert [e for e in load_session(tmp_path / "s")[1] if e["param"] == "prompt"] == []


def fresh(tiny, slots: int = 2) -> MusicGen:
    decoder = MusicGen.random(tiny.cfg, seed=1)
    decoder.setup_caches(2, max_len=16, max_text=32, prompts=slots)
    return decoder


def test_requests_for_a_slot_coalesce_and_failures_reach_wait(tiny):
    worker = PromptWorker(tiny.text, fresh(tiny))
    for text in ("one", "two", "three"):
        worker.submit(0, text)
    last = worker.submit(1, "other")
    worker.start()
    try:
        assert worker.wait(last).request.text == "other"
        deadline = time.monotonic() + 30
        while worker.built < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [b.request.text for b in worker.poll()] == ["three"]
        assert (worker.built, worker.dropped, worker.pending) == (2, 2, 0)
        with pytest.raises(PromptError, match="text tokens"):
            worker.wait(worker.submit(0, "y" * 40))  # 41 tokens: this cache holds 32
    finally:
        worker.stop()
    with pytest.raises(PromptError, match="not running"):
        worker.wait(worker.submit(0, "late"))


def test_pinned_caches_take_a_new_prompt_in_place(tiny):
    """The CUDA-graph path's install, on CPU: a pinned cache keeps its buffers (a graph baked their
    addresses in) and copies the new prompt into them; the step then equals an unpinned one."""
    a, b = fresh(tiny), fresh(tiny)
    for decoder in (a, b):
        states, mask = tiny.text.encode(PROMPT)
        decoder.set_condition(*condition_rows(states, mask, 2))
    for block in a.blocks:
        block.cross_attn.cache.allocate()
        block.cross_attn.cache.pinned = True
    before = [block.cross_attn.cache.keys[1].data_ptr() for block in a.blocks]
    states, mask = tiny.text.encode("drum and bass, fast breakbeats")
    for decoder in (a, b):
        decoder.install_memory(1, decoder.build_memory(*condition_rows(states, mask, 2)), states.shape[1])
        decoder.set_prompt_weights((0.3, 0.7))
    assert [block.cross_attn.cache.keys[1].data_ptr() for block in a.blocks] == before
    codes = torch.zeros(2, tiny.cfg.codebooks, 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(a.step(codes, torch.tensor([0])), b.step(codes, torch.tensor([0])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_a_captured_graph_plays_a_new_prompt_and_morph_without_recapture(tiny):
    from musicsteer.model.graph_step import GraphedStep

    decoder = MusicGen.random(tiny.cfg, seed=1).cuda()
    decoder.setup_caches(2, max_len=16, max_text=32, prompts=2)
    text = dataclasses.replace(tiny.text, model=tiny.text.model.cuda())
    states, mask = text.encode(PROMPT)
    decoder.set_condition(*condition_rows(states, mask, 2))
    graph = GraphedStep(decoder, 2)
    assert graph.captured
    states, mask = text.encode("drum and bass, fast breakbeats")
    decoder.install_memory(1, decoder.build_memory(*condition_rows(states, mask, 2)), states.shape[1])
    codes = torch.zeros(2, tiny.cfg.codebooks, 1, dtype=torch.long, device="cuda")
    for weights in ((0.0, 1.0), (0.4, 0.6)):
        decoder.set_prompt_weights(weights)
        replayed = graph(codes, 0).clone()
        eager = decoder.step(codes, torch.tensor([0], device="cuda"))  # the static path, uncaptured
        torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)


def test_osc_sets_prompt_slots_and_the_morph():
    controls = ControlState([])
    router = OscRouter(controls, [])
    me = ("127.0.0.1", 9)
    assert router.handle("/musicsteer/prompt/2", ["ambient pads"], me) == []
    assert router.handle("/musicsteer/prompt/morph", [1], me) == []
    assert router.handle("/musicsteer/prompt/3/weight", [0.25], me) == []
    assert {c.param: c.value for c in controls.take(0)} == {"prompt/2": "ambient pads", "prompt/morph": 1.0,
                                                           "prompt/3/weight": 0.25}
    assert router.handle("/musicsteer/get/prompt/morph", [], me) == [("/musicsteer/prompt/morph", [1.0])]
    for address, args in (("/musicsteer/prompt/2", [3]), ("/musicsteer/prompt/morph", ["x"]),
                          ("/musicsteer/prompt/9", ["a"]), ("/musicsteer/prompt/morph", [float("nan")])):
        with pytest.raises(Exception, match="string|number|unknown|finite"):
            router.handle(address, args, me)


def test_the_mapping_files_prompts_fill_slots_2_on(tiny, tmp_path):
    from musicsteer.errors import UsageError
    from musicsteer.live.session import with_mapping_prompts

    mapping = tmp_path / "m.toml"
    mapping.write_text('prompts = ["ambient pads", "drum and bass"]\n\n[[cc]]\ncc = 1\nparam = "prompt/morph"\n')
    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=0.2, mapping=mapping, status=False)
    assert with_mapping_prompts(request, []).prompts == ("ambient pads", "drum and bass")
    with pytest.raises(UsageError, match="need 3 prompt slots; the session holds 2"):
        with_mapping_prompts(dataclasses.replace(request, prompt_slots=2), [])
    held, controls = [], ControlState([])
    plain = dataclasses.replace(request, mapping=None, prompts=("ambient pads", "drum and bass"))
    run_live(tiny, plain, controls=controls, on_start=held.append)
    assert held[0].engine.prompts == [PROMPT, "ambient pads", "drum and bass", None]
    assert held[0].model.decoder.prompt_mix.lengths[1:] == [13, 14, 0]  # bytes and EOS, at weight 0
    assert (controls.current("prompt/3"), controls.current("prompt/4"), controls.current("prompt/morph")) == (
        "drum and bass", None, 0.0)
