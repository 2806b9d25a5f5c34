"""MidiController and MIDI learn on a real JACK server (dummy backend): MIDI clients send
through JACK into ControlState; a followed port that disappears and returns is reopened.

Every rtmidi client (the controller's, the senders') is closed before the server stops:
fixtures close them in their teardown, which runs before the server fixture's."""

import argparse
import threading
import time

import mido
import pytest
from jack_server import jack_server_fixture

from musicsteer.cli import midi as midi_cli
from musicsteer.controllers.mapping import Mapping
from musicsteer.controllers.midi import MidiController, MidiError, list_input_ports
from musicsteer.controllers.state import ControlState

pytestmark = pytest.mark.audio

jack = jack_server_fixture(scope="module")
JACK_MIDI = "mido.backends.rtmidi/UNIX_JACK"

MAPPING = """
[[cc]]
cc = 1
param = "concept/cmaj/strength"
range = [0.0, 4.0]
smooth_ms = 30
takeover = "jump"

[[cc]]
cc = 7
bits = 14
param = "cfg"
range = [0.0, 16.383]
takeover = "jump"

[[cc]]
cc = 2
param = "topp"
range = [0.0, 1.0]
"""


def wait_for(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def cc(control, value, channel=1):
    return mido.Message("control_change", channel=channel - 1, control=control, value=value)


@pytest.fixture
def backend(jack):
    return mido.Backend(JACK_MIDI, load=True)


@pytest.fixture
def controller(jack, backend, tmp_path):
    """A running controller and a mido output connected to its virtual input by name."""
    path = tmp_path / "map.toml"
    path.write_text(MAPPING)
    controls = ControlState(["cmaj", "gmaj"])
    ctl = MidiController(controls, Mapping.load(path, controls.concepts), client_name="mstest").start()
    out = backend.open_output("mstest:in")
    try:
        yield ctl, controls, out
    finally:
        out.close()
        ctl.stop()


def test_cc_and_14_bit_pairs_reach_control_state(controller, jack):
    ctl, controls, out = controller
    assert "mstest:in" in jack.ports()
    out.send(cc(1, 127))
    assert wait_for(lambda: controls.current("concept/cmaj/strength") == 4.0)
    (change,) = controls.take(0)
    assert (change.source, change.smooth_ms) == ("midi:mstest:in", 30.0)
    out.send(cc(7, 64))
    out.send(cc(39, 1))
    assert wait_for(lambda: controls.current("cfg") == pytest.approx(8.193))
    out.send(cc(39, 127))
    assert wait_for(lambda: controls.current("cfg") == pytest.approx(8.319))
    out.send(cc(5, 1))  # unbound
    assert wait_for(lambda: ctl.stats().ignored == 1)
    st = ctl.stats()
    assert (st.received, st.applied, st.rejected, st.errors) == (5, 4, 0, 0)


def test_soft_takeover_holds_until_the_knob_passes(controller):
    ctl, controls, out = controller
    controls.seed("topp", 0.5)  # knob position 63.5
    for v in (0, 30, 50, 60):
        out.send(cc(2, v))
    assert wait_for(lambda: ctl.stats().received == 4)
    assert controls.current("topp") == 0.5 and ctl.stats().applied == 0
    out.send(cc(2, 80))  # passes 63.5
    assert wait_for(lambda: controls.current("topp") == pytest.approx(80 / 127))
    out.send(cc(2, 10))
    assert wait_for(lambda: controls.current("topp") == pytest.approx(10 / 127))


def test_rejected_settings_are_counted_not_raised(jack, backend):
    mapping = Mapping.parse('[[cc]]\ncc = 3\nparam = "concept/dmin/strength"\ntakeover = "jump"\n')
    controls = ControlState(["cmaj"])  # dmin is not loaded: ControlState refuses it
    with MidiController(controls, mapping, client_name="msreject") as ctl:
        out = backend.open_output("msreject:in")
        try:
            out.send(cc(3, 100))
            out.send(cc(1, 100))
            assert wait_for(lambda: ctl.stats().received == 2)
            assert wait_for(lambda: ctl.stats().rejected == 1) and ctl.stats().ignored == 1
        finally:
            out.close()


def test_midi_learn_binds_the_next_cc_and_writes_the_file(controller):
    ctl, controls, out = controller
    learner = ctl.learn("concept/gmaj/strength", range=(0.0, 2.0), smooth_ms=20.0)
    out.send(cc(21, 0, channel=3))
    binding = learner.wait(3.0)
    assert (binding.cc, binding.channel, binding.bits, binding.param) == (21, 3, 7, "concept/gmaj/strength")
    text = ctl.mapping.path.read_text()
    assert text.startswith(MAPPING) and "cc = 21\nchannel = 3\nbits = 7\nparam = \"concept/gmaj/strength\"" in text
    assert wait_for(lambda: ctl.stats().learned == 1)
    out.send(cc(21, 127, channel=3))  # the new binding is live (pickup: gmaj was never set, so 0 at cc 0)
    out.send(cc(21, 0, channel=3))
    assert wait_for(lambda: controls.current("concept/gmaj/strength") == 0.0)
    out.send(cc(21, 127, channel=3))
    assert wait_for(lambda: controls.current("concept/gmaj/strength") == 2.0)

    learner = ctl.learn("temperature")  # a 14-bit pair: MSB 10 then LSB 42
    out.send(cc(10, 64))
    out.send(cc(42, 0))
    binding = learner.wait(3.0)
    assert (binding.cc, binding.bits) == (10, 14)
    assert {b.param: (b.cc, b.bits) for b in Mapping.load(ctl.mapping.path).cc_bindings}["temperature"] == (10, 14)


def test_a_followed_port_that_disappears_and_returns_is_reopened(jack, backend):
    mapping = Mapping.parse('[[cc]]\ncc = 1\nparam = "cfg"\nrange = [0.0, 12.7]\ntakeover = "jump"\n')
    controls = ControlState([])
    source = backend.open_output("out", client_name="fakekbd")  # a controller: a JACK MIDI source
    ctl = MidiController(controls, mapping, port="FAKEKBD", client_name="msfollow", poll_s=0.1)
    try:
        ctl.start()
        assert ctl.stats().port == "fakekbd:out" and jack.connections("fakekbd:out") == ["msfollow-link:in"]
        source.send(cc(1, 10))
        assert wait_for(lambda: controls.current("cfg") == pytest.approx(1.0))
        source.close()  # unplugged
        assert wait_for(lambda: ctl.stats().port is None)
        assert "msfollow-link:in" not in jack.ports()
        source = backend.open_output("out", client_name="fakekbd")  # plugged back in
        assert wait_for(lambda: ctl.stats().reconnects == 1 and ctl.stats().port == "fakekbd:out")
        source.send(cc(1, 20))
        assert wait_for(lambda: controls.current("cfg") == pytest.approx(2.0))
        assert ctl.stats().received == 2 and ctl.stats().errors == 0
    finally:
        source.close()
        ctl.stop()
        ctl.stop()  # idempotent
    assert not [p for p in jack.ports() if p.startswith("msfollow")]


def test_start_errors_are_one_line(jack, backend):
    with pytest.raises(MidiError, match=r"no MIDI input matches 'nosuchdevice'; inputs: "):
        MidiController(ControlState([]), Mapping(), port="nosuchdevice", client_name="mserr").start()
    with MidiController(ControlState([]), Mapping(), client_name="msdup"):
        with pytest.raises(MidiError, match="msdup:in exists already"):
            MidiController(ControlState([]), Mapping(), client_name="msdup").start()
    assert not [p for p in jack.ports() if p.startswith(("mserr", "msdup"))]


def test_no_jack_server_is_a_one_line_error(jack, monkeypatch):
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "musicsteer-no-such-server")
    with pytest.raises(MidiError, match=r"^no MIDI system: start JACK"):
        list_input_ports()


# -- the command line --------------------------------------------------------------------------

def cli(*argv):
    parser = argparse.ArgumentParser(prog="musicsteer")
    midi_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.run(args)


def test_cli_ports_and_learn(jack, backend, tmp_path, capsys):
    source = backend.open_output("out", client_name="clikbd")
    try:
        assert cli("midi", "ports") == 0
        assert "clikbd:out" in capsys.readouterr().out.splitlines()
        path = tmp_path / "learned.toml"
        result = {}
        worker = threading.Thread(target=lambda: result.update(rc=cli(
            "midi", "learn", "--map", str(path), "--param", "cfg", "--range", "2", "9", "--curve", "log",
            "--port", "clikbd", "--client-name", "mscli", "--timeout", "5")))
        worker.start()
        assert wait_for(lambda: "clikbd:out" in jack.ports() and jack.connections("clikbd:out"))
        source.send(cc(12, 5, channel=16))
        worker.join(10)
        assert result == {"rc": 0}
        out = capsys.readouterr().out
        assert "learned cc 12 on channel 16 -> cfg" in out and "[[cc]]\ncc = 12\nchannel = 16\n" in out
        (b,) = Mapping.load(path).cc_bindings
        assert (b.cc, b.channel, b.scale.lo, b.scale.hi, b.scale.curve, b.scale.shape) == (12, 16, 2.0, 9.0, "log", 4.0)
    finally:
        source.close()


def test_cli_learn_times_out_and_rejects_bad_options(jack, tmp_path):
    path = tmp_path / "m.toml"
    with pytest.raises(MidiError, match=r"^no control change arrived within 0.2 s on mstimeout:in") as info:
        cli("midi", "learn", "--map", str(path), "--param", "cfg", "--client-name", "mstimeout", "--timeout", "0.2")
    assert info.value.exit_code == 2 and not path.exists()
    with pytest.raises(Exception, match="unknown parameter 'volume'"):
        cli("midi", "learn", "--map", str(path), "--param", "volume")


def test_midi_and_portaudio_share_the_jack_server_in_one_process(jack, backend):
    """The rtmidi wheel brings its own libjack; PortAudio uses the system's. Both clients run
    side by side: knobs keep arriving and playback has no underrun."""
    import numpy as np

    from musicsteer.live.portaudio_sink import PortAudioSink
    from musicsteer.live.ring_buffer import AudioRing

    controls = ControlState(["cmaj"])
    mapping = Mapping.parse('[[cc]]\ncc = 1\nparam = "concept/cmaj/strength"\ntakeover = "jump"\n')
    audio = (0.3 * np.sin(np.arange(32000) * 2 * np.pi * 440 / 32000 + 0.3)).astype(np.float32)
    ring, sink = AudioRing(4096), PortAudioSink(None, sample_rate=32000)
    with MidiController(controls, mapping, client_name="msaudio") as ctl:
        out = backend.open_output("msaudio:in")
        sink.start(ring)
        try:
            i = 0
            for n in range(200):
                while i < len(audio) and ring.write(audio[i:i + 640]):
                    i += 640
                out.send(cc(1, n % 128))
                time.sleep(0.002)
            while i < len(audio):
                i += 640 if ring.write(audio[i:i + 640]) else 0
                time.sleep(0.002)
            assert sink.drain(timeout=3)
            assert wait_for(lambda: ctl.stats().applied == 200)
            assert controls.current("concept/cmaj/strength") == 199 % 128 / 127
            stats = sink.stats()
            assert stats.underruns == 0 and stats.frames_played == len(audio)
        finally:
            sink.stop()
            out.close()


# -- the MIDI system (--midi-api) and scene bindings ------------------------------------------------

def test_auto_picks_jack_when_a_server_runs(jack, backend):
    from musicsteer.controllers.midi import jack_running, resolve_api

    assert jack_running() and resolve_api("auto") == "jack"
    with MidiController(ControlState([]), Mapping(), client_name="msauto", api="auto") as ctl:
        assert ctl.api == "jack" and "msauto:in" in jack.ports()


def test_auto_without_a_jack_server_takes_the_platform_midi_or_names_what_is_missing(jack, monkeypatch, tmp_path):
    import musicsteer.controllers.midi as midi

    monkeypatch.setenv("JACK_DEFAULT_SERVER", "musicsteer-no-such-server")
    assert not midi.jack_running()
    monkeypatch.setattr(midi.sys, "platform", "linux")
    monkeypatch.setattr(midi, "ALSA_SEQ", str(tmp_path / "no-seq"))
    with pytest.raises(MidiError) as exc:
        midi.resolve_api("auto")
    message = str(exc.value)
    assert message.startswith("no MIDI system: start JACK") and "ALSA's sequencer" in message
    assert str(tmp_path / "no-seq") + " is missing" in message and "\n" not in message
    (tmp_path / "seq").touch()  # a machine with ALSA's sequencer
    monkeypatch.setattr(midi, "ALSA_SEQ", str(tmp_path / "seq"))
    assert midi.resolve_api("auto") == "alsa"
    monkeypatch.setattr(midi.sys, "platform", "darwin")  # this python-rtmidi has no CoreMIDI
    with pytest.raises(MidiError, match=r"^no MIDI system: start JACK.*no coremidi API for darwin \(it has jack, alsa\)"):
        midi.resolve_api("auto")


@pytest.mark.parametrize("api, message", [
    ("coremidi", r"^no MIDI system: this python-rtmidi has no coremidi API \(it has jack, alsa\) \(it runs on macOS\)$"),
    ("winmm", r"no winmm API .*Windows"),
    ("beos", r"unknown MIDI API 'beos'"),
])
def test_an_api_this_build_lacks_is_one_line(api, message):
    from musicsteer.controllers.midi import resolve_api

    with pytest.raises(MidiError, match=message):
        resolve_api(api)
    with pytest.raises(MidiError, match=message):
        MidiController(ControlState([]), Mapping(), api=api).start()


def test_jack_named_without_a_server_is_one_line(jack, monkeypatch):
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "musicsteer-no-such-server")
    with pytest.raises(MidiError, match=r"^no MIDI system: start JACK"):
        MidiController(ControlState([]), Mapping(), client_name="msnone", api="jack").start()


def test_live_cli_refuses_a_missing_midi_api(tmp_path):
    import subprocess
    import sys

    mapping = tmp_path / "map.toml"
    mapping.write_text('[[cc]]\ncc = 1\nparam = "cfg"\n')
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x", "--null",
                           "--seconds", "1", "--no-status", "--no-osc", "--map", str(mapping), "--midi-api", "coremidi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "musicsteer: error: no MIDI system: this python-rtmidi has no coremidi API (it has jack, alsa) (it runs on macOS)"]


def test_notes_and_program_changes_recall_scenes_and_panic(jack, backend):
    from musicsteer.controllers.scenes import Scene, SceneBank

    controls = ControlState(["cmaj", "gmaj"])
    bank = SceneBank(controls, [Scene("verse", {"concept/cmaj/strength": 0.5, "cfg": 4.0}, 1.0),
                                Scene("chorus", {"concept/gmaj/strength": 2.0})])
    mapping = Mapping.parse('[[note]]\nnote = 36\nscene = "verse"\n\n[[note]]\nnote = 37\npanic = true\n\n'
                            '[[program]]\nprogram = 3\nchannel = 2\nscene = "chorus"\nseconds = 0.5\n\n'
                            '[[program]]\nprogram = 4\nscene = "nope"\n', concepts=controls.concepts)
    with MidiController(controls, mapping, client_name="msscene", scenes=bank) as ctl:
        out = backend.open_output("msscene:in")
        try:
            out.send(mido.Message("note_on", note=36, velocity=100))
            assert wait_for(lambda: controls.current("cfg") == 4.0)
            assert {c.param: (c.value, c.ramp_ms, c.source) for c in controls.take(0)} == {
                "concept/cmaj/strength": (0.5, 1000.0, "midi:msscene:in:verse"),
                "cfg": (4.0, 1000.0, "midi:msscene:in:verse")}
            out.send(mido.Message("program_change", program=3, channel=0))  # channel 1: not bound
            out.send(mido.Message("program_change", program=3, channel=1))
            assert wait_for(lambda: controls.current("concept/gmaj/strength") == 2.0)
            assert [(c.value, c.ramp_ms) for c in controls.take(1)] == [(2.0, 500.0)]
            out.send(mido.Message("note_on", note=37, velocity=1))
            assert wait_for(lambda: controls.current("concept/gmaj/strength") == 0.0)
            assert {c.param: c.value for c in controls.take(2)} == {"concept/cmaj/strength": 0.0,
                                                                    "concept/gmaj/strength": 0.0}
            out.send(mido.Message("program_change", program=4))  # an unknown scene: refused, counted
            assert wait_for(lambda: ctl.stats().rejected == 1)
        finally:
            out.close()


def test_live_cli_auto_without_jack_is_one_line(jack, tmp_path):
    import os
    import subprocess
    import sys

    if os.path.exists("/dev/snd/seq"):
        pytest.skip("this machine has ALSA's sequencer: auto takes it (the selection is checked above)")
    mapping = tmp_path / "map.toml"
    mapping.write_text('[[cc]]\ncc = 1\nparam = "cfg"\n')
    env = {**os.environ, "JACK_DEFAULT_SERVER": "musicsteer-no-such-server"}
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x", "--null",
                           "--seconds", "1", "--no-status", "--no-osc", "--map", str(mapping)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()  # libjack's own complaints are hushed
    assert line.startswith("musicsteer: error: no MIDI system: start JACK") and "/dev/snd/seq is missing" in line
