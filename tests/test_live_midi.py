"""MIDI into a running stream: a MIDI client on JACK moves a knob mapped to a concept's
strength, and the producer's steering strength follows (14-bit included); a malformed
mapping stops `musicsteer live` at start with the line and the reason."""

import subprocess
import sys
import threading
import time

import mido
import pytest
from jack_server import jack_server_fixture

from musicsteer.controllers.state import ControlState
from musicsteer.live.session import LiveRequest, run_live
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack

pytestmark = pytest.mark.audio
jack = jack_server_fixture(scope="module")

MAPPING = """
[[cc]]
cc = 1
param = "concept/cmaj/strength"
range = [0.0, 2.0]
takeover = "pickup"

[[cc]]
cc = 7
bits = 14
param = "concept/gmaj/strength"
range = [0.0, 16.383]
takeover = "jump"
"""


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_knobs_steer_a_running_stream(jack, tiny, tmp_path):
    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny").save(pack)
    (tmp_path / "map.toml").write_text(MAPPING)
    stop, holder = threading.Event(), {}
    request = LiveRequest("x", SamplingSettings(seed=0), null="realtime", concepts=pack, mapping=tmp_path / "map.toml",
                          steer={"cmaj": 1.0}, status=False)
    controls = ControlState(["cmaj", "gmaj"])
    thread = threading.Thread(target=lambda: holder.update(r=run_live(
        tiny, request, controls, stop=stop, on_start=lambda p: holder.update(p=p))))
    thread.start()
    out = None
    try:
        assert wait_for(lambda: "p" in holder and holder["p"].step > 10, 30)
        plan = holder["p"].plan
        out = mido.Backend("mido.backends.rtmidi/UNIX_JACK", load=True).open_output("musicsteer:in")
        # soft takeover: the strength is 1.0 (knob position 63.5); the knob at 10 does nothing
        out.send(mido.Message("control_change", control=1, value=10))
        time.sleep(0.3)
        assert plan.strengths[0] == pytest.approx(1.0)
        for v in (40, 60, 70, 90):  # passes 63.5: picked up, then follows
            out.send(mido.Message("control_change", control=1, value=v))
            time.sleep(0.05)
        assert wait_for(lambda: plan.strengths[0] == pytest.approx(90 / 127 * 2.0, abs=1e-5))
        # 14-bit: MSB 64, LSB 5 -> (64 * 128 + 5) / 16383 of the range
        out.send(mido.Message("control_change", control=7, value=64))
        out.send(mido.Message("control_change", control=39, value=5))
        assert wait_for(lambda: plan.strengths[1] == pytest.approx((64 * 128 + 5) / 1000, abs=1e-4))
    finally:
        if out is not None:
            out.close()
        stop.set()
        thread.join(20)
    assert holder["r"].stats.error is None and holder["r"].stats.underruns == 0


def test_malformed_mapping_is_rejected_at_start(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[cc]]\ncc = 1\nparam = "cfg"\n\n[[cc]]\ncc = 300\nparam = "cfg"\n')
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x", "--null",
                           "--no-osc", "--map", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("musicsteer: error: ")
    assert "line 6" in proc.stderr and "out of 0..127" in proc.stderr and "Traceback" not in proc.stderr
