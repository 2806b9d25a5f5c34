"""The producer: same tokens as offline generation, continuous audio, windows that roll
over, underruns that are counted and recovered from, clean shutdown in every state,
and recordings that replay to the same tokens."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from musicsteer.controllers.state import ControlState
from musicsteer.live.producer import Producer, StreamConfig
from musicsteer.live.recorder import load_session
from musicsteer.live.ring_buffer import AudioRing
from musicsteer.live.session import LiveRequest, MemoryRecorder, replay, run_live
from musicsteer.live.sinks import NullSink, PacedSink
from musicsteer.model.delay import interleave
from musicsteer.model.generate import generate
from musicsteer.model.sampling import SamplingSettings

PROMPT = "warm lofi piano"
SAMPLING = SamplingSettings(seed=5)


def run_fast(model, config, controls=None, recorder=None, step_hook=None):
    """Run a producer to its time limit with a fast consumer; return it and the recorder."""
    recorder = recorder or MemoryRecorder()
    ring = AudioRing(1 << 15)
    sink = PacedSink(model.codec.sample_rate, realtime=False)
    producer = Producer(model, config, ring, controls, None, recorder, step_hook=step_hook)
    sink.start(ring)
    producer.run()
    sink.drain()
    sink.stop()
    assert producer.error is None
    return producer, recorder, ring


def test_stream_tokens_match_offline_generation(tiny):
    frames = 60
    producer, rec, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, max_seconds=frames / 50))
    streamed = np.stack(rec.frames, axis=1)
    assert streamed.shape == (4, frames)
    offline = generate(tiny.decoder, tiny.text, PROMPT, frames + 3, SAMPLING).codes.numpy()
    # the offline render masks the delay pattern's tail; every frame before it is the same
    np.testing.assert_array_equal(streamed, offline[:, :frames])


def test_the_codec_beside_the_decoder_step_changes_no_sample(tiny):
    """StreamingCodecSettings.overlap: the native codec decodes each frame on thread 0 of the next
    decoder step (kernels/cpu_block.c ms_blocks_side) instead of after its own step; the tokens and
    every audio sample are the same as without it, and the audio of the last frame still comes out."""
    from dataclasses import replace

    from musicsteer.live.producer import StepObserver

    class Hidden(StepObserver):
        def __init__(self):
            self.seconds = []

        def step_timed(self, step, split):
            self.seconds.append(split.codec_hidden)

    config = StreamConfig(PROMPT, SAMPLING, window_s=2.0, keep_s=0.5, reprime_chunk=8, max_seconds=4.0)
    runs = []
    for overlap in (True, False):
        cfg = replace(config, codec=replace(config.codec, overlap=overlap))
        hidden, recorder, ring = Hidden(), MemoryRecorder(), AudioRing(1 << 15)
        producer = Producer(tiny, cfg, ring, None, None, recorder, observers=[hidden])
        sink = PacedSink(tiny.codec.sample_rate, realtime=False)
        sink.start(ring)
        producer.run()
        sink.drain()
        sink.stop()
        assert producer.error is None and producer.reprimes >= 2
        assert (sum(s > 0 for s in hidden.seconds) > 100) == overlap
        assert tiny.decoder.fused_stack.side is None  # no job left behind
        runs.append((np.stack(recorder.frames, axis=1), np.concatenate(recorder.chunks)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1].shape == (200 * 640,)
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_stream_audio_is_continuous_and_equals_offline_decode(tiny):
    frames = 80
    producer, rec, ring = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, max_seconds=frames / 50))
    audio = np.concatenate(rec.chunks)
    assert audio.shape == (frames * 640,)
    offline = tiny.codec.decode(torch.as_tensor(np.stack(rec.frames, axis=1)))
    assert np.abs(audio - offline).max() / np.abs(offline).max() < 1e-4
    assert ring.metrics().frames_written == frames * 640


def test_window_rolls_over_without_a_gap(tiny):
    """A 2 s window that keeps 0.5 s: many re-primes in 12 s, positions never past the window."""
    config = StreamConfig(PROMPT, SAMPLING, window_s=2.0, keep_s=0.5, reprime_chunk=8, max_seconds=12.0)
    fed = []
    original = tiny.decoder.hidden_states

    def watch(codes, input_pos, kv_len=None, use_cache=True):
        fed.append((codes[0].clone(), input_pos.clone()))
        assert int(input_pos.max()) < producer.window
        return original(codes, input_pos, kv_len, use_cache)

    tiny.decoder.hidden_states = watch
    try:
        ring = AudioRing(1 << 15)
        sink = PacedSink(32000, realtime=False)
        rec = MemoryRecorder()
        producer = Producer(tiny, config, ring, None, None, rec)
        sink.start(ring)
        producer.run()
        sink.stop()
    finally:
        del tiny.decoder.hidden_states
    assert producer.error is None
    assert producer.reprimes >= 4
    frames = np.stack(rec.frames, axis=1)
    assert frames.shape == (4, 600) and sum(len(c) for c in rec.chunks) == 600 * 640
    # Each re-prime feeds the window as if generation had started at its first frame:
    # position j of the new window is interleave(frames from that frame)[:, j].
    reprime_feeds = [(c, p) for c, p in fed if c.shape[-1] > 1]
    assert reprime_feeds
    starts = [i for i, (_, p) in enumerate(reprime_feeds) if int(p[0]) == 0]
    assert len(starts) == producer.reprimes
    for i in starts[:2]:
        cols = torch.cat([c for c, _ in reprime_feeds[i:i + 4]], dim=-1)
        # find the frame the window starts at: codebook 0 at position 1 is that frame
        first = int(np.flatnonzero((frames[0] == int(cols[0, 1])))[0])
        want = interleave(torch.as_tensor(frames[:, first:first + 40]), 2048)[:, : cols.shape[-1]]
        assert torch.equal(cols[:, : want.shape[-1]], want)


def test_slow_producer_underruns_are_counted_and_recovered(tiny):
    slow = threading.Event()
    slow.set()

    def hook(step):
        if slow.is_set() and step > 40:
            time.sleep(0.05)  # 50 ms per 20 ms frame: far behind real time

    request = LiveRequest(PROMPT, SAMPLING, null="realtime", seconds=3.0, buffer_ms=60, status=False)
    timer = threading.Timer(1.5, slow.clear)
    timer.start()
    result = run_live(tiny, request, step_hook=hook)
    timer.cancel()
    assert result.stats.error is None
    assert result.stats.underruns > 0
    assert result.stats.frames == 150  # it caught up and finished the whole stream


def test_steps_run_just_in_time_for_their_audio(tiny):
    """Paced by the device, a step starts only once its audio will fit in the buffer, so its
    frame reaches the ring right after it (not a frame later, after waiting for room), and the
    controls it read were as fresh as the buffer allows. The ring never runs dry."""
    from musicsteer.bench.timeline import Timeline

    holder = {}
    timeline = Timeline(steps=200)

    def on_start(producer):
        producer.observers.append(timeline)
        holder["p"] = producer

    request = LiveRequest(PROMPT, SAMPLING, null="realtime", seconds=3.0, buffer_ms=60, status=False)
    result = run_live(tiny, request, on_start=on_start)
    assert result.stats.error is None and result.stats.underruns == 0
    starts = timeline.step_start[~np.isnan(timeline.step_start)]
    gaps = [t - starts[starts <= t].max() for _, _, _, t in timeline.pushes[20:-5]]  # steady state
    assert len(gaps) > 80
    # a frame is 20 ms; a tiny step and its decode take a few ms here
    assert np.median(gaps) < 0.008, np.median(gaps)


@pytest.mark.parametrize("when", ["before-audio", "playing", "paused", "finished"])
def test_shutdown_is_clean_in_every_state(tiny, when):
    stop = threading.Event()
    request = LiveRequest(PROMPT, SAMPLING, null="realtime", seconds=None if when != "finished" else 0.5,
                          status=False)
    delays = {"before-audio": 0.0, "playing": 0.6, "paused": 0.6, "finished": 3.0}
    result = {}

    def go():
        result["r"] = run_live(tiny, request, stop=stop)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(delays[when])
    stop.set()
    t.join(10)
    assert not t.is_alive()
    assert result["r"].stats.error is None and not result["r"].stats.running


def test_controls_take_effect_at_the_next_step_and_are_logged(tiny, tmp_path):
    """Numbers at the next step; a prompt at the start of the step after the worker built it (here
    the producer holds step 31 until the worker is done, so that is step 32), logged there with the
    step it was asked at."""
    controls = ControlState([])
    producer = {}

    def hook(step):
        if step == 30:
            controls.set("temperature", 0.5, source="test")
            controls.set("prompt", "fast techno", source="test")
        if step == 31:
            deadline = time.monotonic() + 30
            while producer["p"].prompt_worker.pending and time.monotonic() < deadline:
                time.sleep(0.005)

    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=1.0, record=tmp_path / "s", status=False)
    run_live(tiny, request, controls=controls, step_hook=hook, on_start=lambda p: producer.update(p=p))
    info, entries, tokens = load_session(tmp_path / "s")
    assert {e["param"]: e["step"] for e in entries} == {"temperature": 31, "prompt": 32}
    assert [e["received_step"] for e in entries if e["param"] == "prompt"] == [30]
    assert info["complete"] and info["frames"] == 50 and tokens.shape == (4, 50)


def test_replay_gives_identical_tokens(tiny, tmp_path):
    controls = ControlState([])

    def hook(step):
        if step == 20:
            controls.set("topk", 5)
        if step == 45:
            controls.set("prompt", "slow ambient pads")

    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=2.0, record=tmp_path / "s", status=False,
                          window_s=1.2, keep_s=0.3)
    run_live(tiny, request, controls=controls, step_hook=hook)
    _, entries, recorded = load_session(tmp_path / "s")
    assert len(entries) == 2
    tokens, audio, _ = replay(tiny, tmp_path / "s")
    np.testing.assert_array_equal(tokens, recorded)
    wav, sr = sf.read(tmp_path / "s" / "audio.wav")
    assert sr == 32000 and len(wav) == len(audio) == 100 * 640


def test_killed_session_leaves_files_that_load(tmp_path):
    session = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", PROMPT,
                             "--null", "--record", str(session), "--no-status", "--osc-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for at least two seconds of recorded audio
            wav = session / "audio.wav"
            if wav.exists() and wav.stat().st_size > 2 * 32000 * 2 + 44:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the session recorded nothing: " + proc.stderr.read1().decode())
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    audio, sr = sf.read(session / "audio.wav")
    assert sr == 32000 and len(audio) >= 32000
    info, entries, tokens = load_session(session)
    assert info["model"] == "tiny" and not info["complete"]
    assert tokens.shape[0] == 4 and tokens.shape[1] >= 40
    assert isinstance(entries, list)
    json.loads((session / "session.json").read_text())


def test_sigterm_finishes_the_recording(tmp_path):
    session = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", PROMPT,
                             "--null", "--record", str(session), "--no-status", "--osc-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (session / "audio.wav").exists():
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    info, _, tokens = load_session(session)
    assert info["complete"] and info["frames"] == tokens.shape[1] > 0
    assert "underruns" in out


def test_null_sink_in_real_time_plays_at_the_clock(tiny):
    ring = AudioRing(1 << 12)
    sink = NullSink(32000, realtime=True)
    sink.start(ring)
    time.sleep(0.5)
    sink.stop()
    played = sink.stats().frames_played
    assert 0.3 * 32000 < played < 0.7 * 32000
    assert ring.metrics().underruns > 0  # nothing was written: every block was silence


def test_reduced_precision_model_streams_and_rolls_over():
    """int8 weights with a bfloat16 KV cache: the stream equals offline generation with the same
    model, and windows re-prime into bfloat16 spare caches."""
    from musicsteer.model.loading.load import load_model

    model = load_model("tiny", weights="int8")
    assert model.decoder.cache_dtype == torch.bfloat16
    frames = 40
    _, rec, _ = run_fast(model, StreamConfig(PROMPT, SAMPLING, max_seconds=frames / 50))
    offline = generate(model.decoder, model.text, PROMPT, frames + 3, SAMPLING).codes.numpy()
    np.testing.assert_array_equal(np.stack(rec.frames, axis=1), offline[:, :frames])
    producer, rec, _ = run_fast(model, StreamConfig(PROMPT, SAMPLING, window_s=1.0, keep_s=0.3, reprime_chunk=8,
                                                    max_seconds=4.0))
    assert producer.reprimes >= 3 and len(rec.frames) == 200
    assert all(c.k.dtype == torch.bfloat16 for c in model.decoder.caches)


def test_graphed_steps_follow_the_cache_swaps_of_the_re_prime(tiny, monkeypatch):
    """`graph=True` steps through one graphed step per cache set (off CUDA the captured path runs
    eagerly): the frames equal the eager stream's across re-primes, and both sets' steps are used."""
    from musicsteer.model.graph_step import GraphedStep

    config = dict(window_s=2.0, keep_s=0.5, reprime_chunk=8, max_seconds=5.0)
    _, eager, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, graph=False, **config))
    used: dict[int, int] = {}
    original = GraphedStep.__call__

    def counted(self, codes, position):
        used[id(self)] = used.get(id(self), 0) + 1
        return original(self, codes, position)

    monkeypatch.setattr(GraphedStep, "__call__", counted)
    producer, graphed, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, graph=True, **config))
    assert producer.reprimes >= 2 and len(producer.graphs) == 2
    assert sorted(used) == sorted(id(g) for g in producer.graphs.values()) and min(used.values()) > 20
    np.testing.assert_array_equal(np.stack(graphed.frames, axis=1), np.stack(eager.frames, axis=1))


def test_step_split_is_told_to_observers_that_ask(tiny):
    """An observer implementing `step_timed` turns the producer's timing on and gets every step's
    split: the parts fit in the total, and the re-prime's positions are counted where it runs."""
    from musicsteer.live.producer import StepObserver

    class Splits(StepObserver):
        def __init__(self):
            self.got = []

        def step_timed(self, step, split):
            self.got.append((step, split))

    splits = Splits()
    config = StreamConfig(PROMPT, SAMPLING, window_s=2.0, keep_s=0.5, reprime_chunk=8, max_seconds=4.0)
    ring = AudioRing(1 << 15)
    sink = PacedSink(32000, realtime=False)
    producer = Producer(tiny, config, ring, None, None, MemoryRecorder(), observers=[splits])
    assert producer.timing and not Producer(tiny, config, ring).timing
    sink.start(ring)
    producer.run()
    sink.stop()
    assert producer.error is None and producer.reprimes >= 2
    assert [s for s, _ in splits.got] == list(range(producer.step))
    for _, sp in splits.got:
        assert min(sp.controls, sp.decode, sp.reprime, sp.codec, sp.ring_wait) >= 0
        assert sp.decode + sp.reprime + sp.codec + sp.controls <= sp.total + 1e-6 and sp.other >= -1e-6
    primed = [sp.reprime_positions for _, sp in splits.got]
    assert max(primed) == 8 and sum(p > 0 for p in primed) >= 2 * producer.reprimes
    idle = [sp.reprime for _, sp in splits.got if sp.reprime_positions == 0]  # the window's bookkeeping only
    assert np.median(idle) < np.median([sp.reprime for _, sp in splits.got if sp.reprime_positions > 0])
    # every frame goes to the codec, decoded beside the next step's decoder (the fused blocks' thread 0)
    assert all(sp.codec_hidden > 0 and sp.codec > 0 for s, sp in splits.got if s >= 4)
    assert max(sp.position for _, sp in splits.got) < producer.window


def test_choose_chunk_takes_the_largest_slice_within_the_budget():
    from musicsteer.live.window import choose_chunk

    # a step of 10 ms, slices of 2 ms + 0.5 ms per position: 20 ms leaves room for 16 positions
    assert choose_chunk(10.0, (2.0, 0.5), 20.0, 1504, 500, 4, fallback=32) == 16
    assert choose_chunk(10.0, (2.0, 0.5), 1e9, 1504, 500, 4, fallback=32) == 64
    assert choose_chunk(19.0, (2.0, 0.5), 20.0, 1504, 500, 4, fallback=32) == 32  # none fits
    # a slice too small to re-prime before the window fills is never chosen
    assert choose_chunk(0.0, (0.0, 1.0), 3.0, 104, 25, 4, fallback=8) == 3
    assert choose_chunk(0.0, (0.0, 1.0), 2.0, 60, 25, 4, fallback=8) == 8


def test_the_default_window_depends_on_the_device():
    from musicsteer.live.window import default_window

    assert default_window("cpu") == (15.0, 5.0) and default_window("cuda") == (30.0, 10.0)
    assert default_window("cpu", 9.0) == (9.0, 3.0)  # a third of a given window, at most the default keep
    assert default_window("cpu", 60.0) == (60.0, 5.0)
    assert default_window("cuda", 20.0, 2.0) == (20.0, 2.0) and default_window("cpu", None, 4.0) == (15.0, 4.0)
    assert default_window("mps") == (30.0, 10.0)


def test_reprime_budget_picks_a_slice_and_streams_as_that_fixed_slice(tiny, tmp_path):
    """Under a time budget the slice is chosen once, before the first re-prime; the stream then equals
    one run with that slice fixed, and a recording replays with the slice it used."""
    config = dict(window_s=2.0, keep_s=0.5, reprime_chunk=8, max_seconds=5.0)
    wide, rec, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, reprime_budget_ms=1e6, **config))
    assert wide.stats().reprime_chunk == 64 and wide.reprimes >= 2 and wide.slice_cost is not None
    _, fixed, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, **dict(config, reprime_chunk=64)))
    np.testing.assert_array_equal(np.stack(rec.frames, axis=1), np.stack(fixed.frames, axis=1))
    tight, rec, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, reprime_budget_ms=0.0, **config))
    assert tight.stats().reprime_chunk == 8  # nothing fits: the configured slice
    _, fixed, _ = run_fast(tiny, StreamConfig(PROMPT, SAMPLING, **config))
    np.testing.assert_array_equal(np.stack(rec.frames, axis=1), np.stack(fixed.frames, axis=1))
    request = LiveRequest(PROMPT, SAMPLING, null="fast", seconds=4.0, record=tmp_path / "s", status=False,
                          window_s=2.0, keep_s=0.5, reprime_budget_ms=1e6)
    run_live(tiny, request)
    info, _, recorded = load_session(tmp_path / "s")
    assert info["reprime_chunk"] == 64 and info["stream"]["reprime_budget_ms"] == 1e6
    tokens, _, _ = replay(tiny, tmp_path / "s")
    np.testing.assert_array_equal(tokens, recorded)


def test_the_re_prime_steers_each_position_as_its_step_was_steered(tiny):
    """With a gate that opens every other step or so, the positions a re-prime recomputes get
    the strengths their own steps had (the plan's record), not those of the step it runs at."""
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.plan import SteeringSettings, build_steering

    pack = ConceptPack.random(["c0", "c1"], tiny.cfg, "tiny", seed=2)
    steerer, plan = build_steering(tiny.decoder, pack, SteeringSettings(gate=0.5, seed=3, layers="all"), batch=2)
    plan.set_strength("c0", 2.0)
    plan.set_strength("c1", -1.0)
    config = StreamConfig(PROMPT, SAMPLING, window_s=1.0, keep_s=0.4, reprime_chunk=8, max_seconds=2.4)
    stepped, replayed = {}, []  # step -> layer 0's alpha (B, K); (global column, alpha it was re-primed with)
    write = plan.write

    def recording_write(step, s):
        write(step, s)
        stepped[step] = s.alpha[0].clone()

    plan.write = recording_write
    original = tiny.decoder.hidden_states

    def watch(codes, input_pos, kv_len=None, use_cache=True):
        context = producer.context
        if context.reprime_due and tiny.decoder.caches[0] is context.spare[0]:  # a re-prime slice
            hook = steerer._hooks[0]
            per = hook.positions if hook.positions is not None else steerer.alpha[0][:, None].expand(
                -1, codes.shape[-1], -1)  # (B, T, K)
            base = context._reprime["base"]
            replayed.extend((base + int(p), per[:, j].clone()) for j, p in enumerate(input_pos))
        return original(codes, input_pos, kv_len, use_cache)

    tiny.decoder.hidden_states = watch
    try:
        ring = AudioRing(1 << 15)
        sink = PacedSink(32000, realtime=False)
        producer = Producer(tiny, config, ring, None, (steerer, plan), MemoryRecorder())
        sink.start(ring)
        producer.run()
        sink.stop()
    finally:
        del tiny.decoder.hidden_states
    assert producer.error is None and producer.reprimes >= 2
    assert len(replayed) >= 2 * 20
    for column, alpha in replayed:
        torch.testing.assert_close(alpha, stepped[column], msg=f"column {column}")
    # the gate really changed the strengths between the steps of one re-prime
    assert len({bool(a.abs().sum() > 0) for _, a in replayed}) == 2


def test_bench_codec_overlap_script_takes_turns_on_tiny(tmp_path):
    """scripts/bench_codec_overlap.py: one stream whose steps take both codec placements in turns;
    the record has both, and the codec ran inside the decoder step only in its own turns."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "overlap.json"
    done = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_codec_overlap.py"), "--model", "tiny",
                           "--weights", "full", "--kv-cache", "auto", "--codec-precision", "float32", "--seconds", "4",
                           "--window", "2", "--keep", "0.5", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    after, beside = record["modes"]["after"], record["modes"]["beside"]
    assert after["steps"] >= 40 and beside["steps"] >= 40
    assert after["codec_inside_decode_ms_mean"] == 0.0 and after["codec_ms_mean"] > 0
    assert beside["codec_inside_decode_ms_mean"] > 0
    assert record["saved_ms_per_step"] == pytest.approx(after["step_ms_mean"] - beside["step_ms_mean"])
