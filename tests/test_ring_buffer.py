"""AudioRing: the SPSC ring between the stream's producer and its sink."""

import dataclasses
import threading
import time
from collections import deque

import numpy as np
import pytest

from musicsteer.live.ring_buffer import AudioRing, RingMetrics


def ramp(start: int, n: int) -> np.ndarray:
    # float32 holds integers exactly up to 2**24: sample values double as frame indices
    return np.arange(start, start + n, dtype=np.float32)


@pytest.mark.parametrize("capacity", [0, -4, 3, 6, 1000, 2.0, True, "8"])
def test_capacity_must_be_a_power_of_two(capacity):
    with pytest.raises(ValueError, match="power of two"):
        AudioRing(capacity)


@pytest.mark.parametrize("capacity", [1, 2, 1024, np.int64(4096)])
def test_power_of_two_capacities_hold_exactly_capacity_frames(capacity):
    ring = AudioRing(capacity)
    assert ring.capacity == capacity
    assert ring.write_available() == capacity and ring.read_available() == 0
    assert ring.write(ramp(0, int(capacity)))
    assert ring.read_available() == capacity and ring.write_available() == 0


def test_writes_are_all_or_nothing():
    ring = AudioRing(8)
    assert ring.write(ramp(0, 5))
    assert not ring.write(ramp(5, 4))  # 3 free: nothing of the 4 is written
    m = ring.metrics()
    assert (m.fill, m.frames_written, m.rejected_writes) == (5, 5, 1)
    assert ring.write(ramp(5, 3))
    assert not ring.write(ramp(8, 1))
    out = np.empty(8, np.float32)
    assert ring.read_into(out) == 8
    np.testing.assert_array_equal(out, ramp(0, 8))
    assert ring.metrics().rejected_writes == 2


def test_blocks_that_can_never_fit_or_are_not_mono_raise():
    ring = AudioRing(8)
    with pytest.raises(ValueError, match="exceeds"):
        ring.write(np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        ring.write(np.zeros((2, 2), np.float32))
    assert ring.write(np.zeros(0, np.float32))
    assert ring.write(np.arange(3, dtype=np.float64))  # converted, not rejected
    assert ring.metrics().frames_written == 3


def test_short_read_plays_what_is_there_zero_fills_and_counts_one_underrun():
    ring = AudioRing(16)
    ring.write(ramp(1, 5))
    out = np.full(8, 7.0, np.float32)
    assert ring.read_into(out) == 5
    np.testing.assert_array_equal(out, [1, 2, 3, 4, 5, 0, 0, 0])
    assert ring.read_into(out) == 0  # empty: all silence, one more underrun
    assert not out.any()
    m = ring.metrics()
    assert (m.underruns, m.underrun_frames, m.frames_read) == (2, 3 + 8, 5)
    ring.write(ramp(6, 8))
    assert ring.read_into(out) == 8  # a full read is not an underrun
    assert ring.metrics().underruns == 2


def test_read_into_needs_a_writable_float32_vector():
    ring = AudioRing(8)
    for bad in (np.zeros(4), np.zeros((2, 2), np.float32), np.zeros(8, np.float32)[::2], [0.0]):
        with pytest.raises(TypeError):
            ring.read_into(bad)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypeError):
        ring.read_into(ro)


def test_metrics_are_a_frozen_snapshot():
    ring = AudioRing(32)
    ring.write(ramp(0, 20))
    ring.read_into(np.empty(6, np.float32))
    m = ring.metrics()
    assert m == RingMetrics(
        capacity=32, fill=14, frames_written=20, frames_read=6,
        underruns=0, underrun_frames=0, rejected_writes=0,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.fill = 0
    ring.write(ramp(20, 10))
    assert m.fill == 14  # the snapshot does not follow the ring
    assert ring.metrics().fill == 24


def test_a_c_consumer_excludes_read_into_and_reports_its_underruns():
    ring = AudioRing(8)
    pa = ring.attach_consumer("sink A")
    assert len(pa) == 8 and pa.elementsize == 4  # what rtmixer.Mixer.play_ringbuffer takes
    with pytest.raises(RuntimeError, match="sink A"):
        ring.read_into(np.empty(4, np.float32))
    with pytest.raises(RuntimeError, match="sink A"):
        ring.attach_consumer("sink B")
    ring.write(ramp(0, 6))
    assert pa.readinto(np.empty(4, np.float32)) == 4  # as the C side reads it
    ring.count_underrun(0)
    ring.count_underrun(100, events=0)
    m = ring.metrics()
    assert (m.frames_read, m.fill, m.underruns, m.underrun_frames) == (4, 2, 1, 100)
    with pytest.raises(RuntimeError):
        ring.detach_consumer("sink B")
    ring.detach_consumer("sink A")
    assert ring.read_into(np.empty(2, np.float32)) == 2


def test_wraps_around_correctly_over_many_random_writes_and_reads():
    rng = np.random.default_rng(0)
    ring, model = AudioRing(64), deque()
    next_value = rejected = underruns = short = 0
    for _ in range(4000):
        n = int(rng.integers(1, 65))
        block = ramp(next_value, n)
        ok = ring.write(block)
        assert ok == (len(model) + n <= 64)
        if ok:
            model.extend(block.tolist())
            next_value += n
        else:
            rejected += 1
        want = int(rng.integers(1, 81))
        out = np.full(want, -1.0, np.float32)
        got = ring.read_into(out)
        expect = [model.popleft() for _ in range(min(want, len(model)))]
        assert got == len(expect)
        np.testing.assert_array_equal(out[:got], expect)
        assert not out[got:].any()
        if got < want:
            underruns += 1
            short += want - got
        assert ring.read_available() == len(model)
    m = ring.metrics()
    assert m.frames_written == next_value and m.frames_read == next_value - len(model)
    assert (m.rejected_writes, m.underruns, m.underrun_frames) == (rejected, underruns, short)


def test_two_threads_deliver_every_sample_once_and_in_order():
    ring = AudioRing(1024)
    total = 1 << 21  # float32 counts exactly up to 2**24
    deadline = time.monotonic() + 5.0
    received = []
    errors = []
    done = threading.Event()

    def producer():
        rng = np.random.default_rng(1)
        sent = 0
        while sent < total and time.monotonic() < deadline:
            n = min(int(rng.integers(1, 700)), total - sent)
            if ring.write(ramp(sent, n)):
                sent += n
            else:
                time.sleep(0)

    def consumer():
        rng = np.random.default_rng(2)
        while time.monotonic() < deadline:
            out = np.empty(int(rng.integers(1, 600)), np.float32)
            got = ring.read_into(out)
            received.append(out[:got].copy())
            if done.is_set() and ring.read_available() == 0:
                return
            if got == 0:
                time.sleep(0)  # hand the GIL to the producer, as it does when the ring is full

    def observer():  # metrics from a third thread stay consistent
        last = ring.metrics()
        while (not done.is_set() or ring.read_available()) and time.monotonic() < deadline + 5.0:
            m = ring.metrics()
            if not (
                0 <= m.fill <= m.capacity
                and m.frames_read == m.frames_written - m.fill
                and m.frames_written >= last.frames_written
                and m.frames_read >= last.frames_read
            ):
                errors.append(m)
            last = m
            time.sleep(0.0005)

    # daemons that end by the deadline: a failure here must not hang the test run
    threads = [threading.Thread(target=f, daemon=True) for f in (consumer, observer)]
    for t in threads:
        t.start()
    producer()
    done.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    data = np.concatenate(received)
    assert len(data) == total, "the stress test ran out of time"
    np.testing.assert_array_equal(data, ramp(0, total))
    m = ring.metrics()
    assert m.frames_read == m.frames_written == total
