"""`musicsteer live` end to end on a real-time-paced audio device with no hardware:
JACK's dummy backend, PortAudio through rtmixer's C callback, and `jack_rec` (JACK's
own client, another process) recording what was played."""

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from jack_server import jack_server_fixture

pytestmark = pytest.mark.audio
jack = jack_server_fixture(scope="module", sample_rate=32000, period=256)


def wait_for_port(server, proc, timeout=90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = [p for p in server.ports() if p.startswith("PortAudio") and ":out_" in p]
        if ports:
            return ports[0]
        if proc.poll() is not None:
            pytest.fail(f"musicsteer live exited early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("musicsteer live never opened its PortAudio output")


def test_live_plays_into_jack_without_underruns(jack, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "warm lofi piano",
         "--seconds", "9", "--no-status", "--osc-port", "0", "--record", str(tmp_path / "session")],
        env=jack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = wait_for_port(jack, proc)
        rec = jack.record(tmp_path / "heard.wav", 4, [port])
        deadline = time.monotonic() + 5
        while not any(c.startswith("jackrec:") for c in jack.connections(port)):
            assert time.monotonic() < deadline, "jack_rec did not connect"
            time.sleep(0.01)
        assert rec.wait(timeout=20) == 0
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    heard, rate = sf.read(tmp_path / "heard.wav")
    assert rate == 32000 and len(heard) == 4 * 32000
    # music all the way through: no stretch of digital silence longer than one JACK period
    silent = np.flatnonzero(heard == 0.0)
    runs = np.split(silent, np.flatnonzero(np.diff(silent) != 1) + 1) if len(silent) else []
    assert max((len(r) for r in runs), default=0) < 256
    assert np.abs(heard).max() > 1e-3
    played = re.search(r"played ([\d.]+) s: (\d+) frames, (\d+) underruns", out)
    assert played, out
    assert float(played.group(1)) == 9.0 and int(played.group(3)) == 0
    # what JACK carried is what the engine recorded, in order
    recorded, _ = sf.read(tmp_path / "session" / "audio.wav")
    assert len(recorded) == 9 * 32000
    probe = np.round(heard[32000:32000 + 2000] * 32767).astype(np.int64)
    ref = np.round(recorded * 32767).astype(np.int64)
    starts = np.flatnonzero(np.abs(ref[: len(ref) - len(probe)] - probe[0]) <= 2)
    assert any(np.abs(ref[i:i + len(probe)] - probe).max() <= 2 for i in starts), \
        "the played audio is not found in the session recording"


def test_live_without_a_device_says_so(tmp_path):
    """No JACK server and no sound card: a one-line message naming --out and --null."""
    env = {"JACK_NO_START_SERVER": "1", "JACK_DEFAULT_SERVER": "musicsteer-none", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x",
                           "--seconds", "1", "--no-status"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("musicsteer:")]
    assert len(lines) == 1 and "--out" in lines[0] and "--null" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_control_follows_changes_to_the_device(jack):
    """`bench control` on JACK's dummy device: OSC changes sent during a stream are followed to the
    device's output times, and each latency's parts are reported beside its total."""
    from musicsteer.api import load_model
    from musicsteer.bench.control import DEPENDENT_PARTS, PARTS, format_control, run_control_bench

    record = run_control_bench(load_model("tiny", device="cpu"), None, messages=6, interval_s=0.1, buffer_ms=60.0,
                               codec_precision="int8")
    assert record["codec"]["precision"] == "int8" and record["messages"] == 6
    assert record["followed"] >= 4, record
    for kind, parts in (("dependent_sample", DEPENDENT_PARTS), ("steered_frame", PARTS)):
        table = record["ms"][kind]
        assert set(table) == {"total", *parts}
        assert 0 < table["total"]["p50"] <= table["total"]["max"] < 2000
        assert table["device"]["p50"] >= 0 and table["ring_buffer"]["p50"] >= 0
    # the steered frame waits for the whole delay pattern: never sooner than the first dependent sample
    assert record["ms"]["steered_frame"]["total"]["p50"] > record["ms"]["dependent_sample"]["total"]["p50"]
    assert "changes followed" in format_control(record)
