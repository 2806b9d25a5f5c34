"""OSC control of a running stream: the router's rules, replies to /get, meters to
listeners, an outside client (liblo's oscsend), bad input that never stops the music, and a
strength outside the steering mode's range: clamped, logged and answered with an error."""

import os
import random
import subprocess
import sys
import time

import pytest
from osc_client import Client, free_port, live_session

from musicsteer.controllers.osc import OscError, OscRouter
from musicsteer.controllers.state import ControlError, ControlState
from musicsteer.errors import MusicsteerError
from musicsteer.live.recorder import load_session
from musicsteer.steering.pack import ConceptPack
from musicsteer.steering.plan import SteeringSettings

ME = ("127.0.0.1", 5555)


# -- the router ------------------------------------------------------------------------------------

def router():
    cs = ControlState(["cmaj", "gmaj"])
    cs.seed("cfg", 3.0)
    return OscRouter(cs, ["cmaj", "gmaj"]), cs


def test_router_sets_and_gets():
    r, cs = router()
    assert r.handle("/musicsteer/concept/cmaj/strength", [0.5], ME) == []
    assert r.handle("/musicsteer/concept/gmaj/strength", [1], ME) == []  # ints are numbers too
    assert r.handle("/musicsteer/topk", [12.7], ME) == []
    assert r.handle("/musicsteer/get/concept/cmaj/strength", [], ME) == [("/musicsteer/concept/cmaj/strength", [0.5])]
    assert r.handle("/musicsteer/get/cfg", [], ME) == [("/musicsteer/cfg", [3.0])]
    assert r.handle("/musicsteer/get/concepts", [], ME) == [("/musicsteer/concepts", ["cmaj", "gmaj"])]
    assert {c.param: c.value for c in cs.take(0)} == {
        "concept/cmaj/strength": 0.5, "concept/gmaj/strength": 1.0, "topk": 13}


def test_router_subscriptions():
    r, _ = router()
    assert r.handle("/musicsteer/listen", [1], ME) == [("/musicsteer/listening", [1])]
    assert r.subscribers == {ME}
    r.handle("/musicsteer/listen", [0], ME)
    assert r.subscribers == set()


@pytest.mark.parametrize("address, args, message", [
    ("/musicsteer/concept/cmaj/strength", ["loud"], "needs a number"),
    ("/musicsteer/concept/cmaj/strength", [], "takes 1 argument, got 0"),
    ("/musicsteer/concept/cmaj/strength", [0.1, 0.2], "takes 1 argument, got 2"),
    ("/musicsteer/concept/dmin/strength", [0.1], "unknown concept 'dmin'"),
    ("/musicsteer/concept/cmaj/strength", [float("nan")], "finite"),
    ("/musicsteer/cfg", [float("inf")], "finite"),
    ("/musicsteer/prompt", [3], "needs a string"),
    ("/musicsteer/volume", [1.0], "unknown address"),
    ("/other/thing", [1.0], "addresses start with /musicsteer/"),
    ("/musicsteer/get/volume", [], "nothing to get"),
    ("/musicsteer/learn", ["cfg"], "MIDI learn needs MIDI input"),
    ("/musicsteer/listen", ["yes"], "needs a number"),
])
def test_router_rejects_bad_messages(address, args, message):
    r, _ = router()
    with pytest.raises((OscError, ControlError), match=message):
        r.handle(address, args, ME)


def test_router_clamps_out_of_range():
    r, cs = router()
    r.handle("/musicsteer/cfg", [1e6], ME)
    r.handle("/musicsteer/temperature", [-3], ME)
    assert cs.current("cfg") == 20.0 and cs.current("temperature") == 1e-3


def test_router_clamps_a_strength_outside_the_modes_range_and_says_so(caplog):
    """In ablate or clamp mode a strength outside [0, 1] is clamped, applied, logged, and
    answered with an error (the music goes on with the clamped value)."""
    cs = ControlState(["cmaj"])
    r = OscRouter(cs, ["cmaj"], strengths=(0.0, 1.0))
    with caplog.at_level("WARNING", logger="musicsteer.osc"):
        replies = r.handle("/musicsteer/concept/cmaj/strength", [1.7], ME)
    assert replies == [("/musicsteer/error", ["/musicsteer/concept/cmaj/strength: the steering mode takes "
                                              "strengths in [0, 1], got 1.7; clamped to 1"])]
    assert cs.current("concept/cmaj/strength") == 1.0 and "clamped to 1" in caplog.text
    assert r.handle("/musicsteer/concept/cmaj/strength", [-2], ME)[0][0] == "/musicsteer/error"
    assert cs.current("concept/cmaj/strength") == 0.0
    assert r.handle("/musicsteer/concept/cmaj/strength", [0.4], ME) == []
    assert OscRouter(cs, ["cmaj"]).handle("/musicsteer/concept/cmaj/strength", [-2], ME) == []  # add: any sign


# -- a running stream ------------------------------------------------------------------------------------

def live_stream(tiny, tmp_path, **request):
    """A live tiny stream with two concepts, OSC on a free port, recording; yields (port, holder, session)."""
    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny", seed=1).save(pack)
    # 150 ms ahead: the flood test holds the GIL in the OSC thread for much of a second
    return live_session(tiny, tmp_path, pack, ["cmaj", "gmaj"], buffer_ms=150, **request)


@pytest.fixture
def stream(tiny, tmp_path):
    with live_stream(tiny, tmp_path) as s:
        yield s


def test_a_strength_outside_the_modes_range_is_clamped_and_answered_live(tiny, tmp_path):
    with live_stream(tiny, tmp_path, steering=SteeringSettings(mode="ablate")) as (port, holder, _):
        c = Client(port)
        c.send("/musicsteer/concept/cmaj/strength", 1.5)
        got = c.replies(2.0, until=lambda r: len(r) >= 1)
        assert got == [("/musicsteer/error", ["/musicsteer/concept/cmaj/strength: the steering mode takes "
                                              "strengths in [0, 1], got 1.5; clamped to 1"])]
        time.sleep(0.3)
        producer = holder["p"]
        assert producer.plan.strengths[0] == 1.0 and producer.running and producer.error is None


def test_get_listen_and_set_on_a_running_stream(stream):
    port, holder, session = stream
    c = Client(port)
    c.send("/musicsteer/get/cfg")
    c.send("/musicsteer/get/concept/cmaj/strength")
    got = c.replies(2.0, until=lambda r: len(r) >= 2)
    assert ("/musicsteer/cfg", [3.0]) in got and ("/musicsteer/concept/cmaj/strength", [0.0]) in got
    c.send("/musicsteer/listen", 1)
    frames = c.replies(1.0)
    meters = [a for a, _ in frames if a.startswith("/musicsteer/meter/")]
    stats = [args for a, args in frames if a == "/musicsteer/stats"]
    assert {"/musicsteer/meter/cmaj", "/musicsteer/meter/gmaj"} <= set(meters)
    assert len(stats) >= 20  # every frame, 50 per second
    assert all(len(s) == 5 and s[2] == 0 for s in stats)  # step ms, fill, underruns 0, steps, RTF
    c.send("/musicsteer/listen", 0)
    c.send("/musicsteer/concept/cmaj/strength", 0.75)
    time.sleep(0.3)
    assert holder["p"].plan.strengths[0] == pytest.approx(0.75)


def test_bad_input_never_stops_the_music(stream):
    port, holder, _ = stream
    producer = holder["p"]
    c = Client(port)
    time.sleep(0.3)
    before = producer.stats().underruns
    rng = random.Random(0)
    for _ in range(50):
        c.raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    c.raw(b"")
    c.send("/musicsteer/concept/cmaj/strength", "loud")
    c.send("/musicsteer/concept/cmaj/strength")
    c.send("/musicsteer/concept/nope/strength", 0.1)
    c.send("/musicsteer/cfg", float("nan"))
    c.send("/musicsteer/cfg", float("-inf"))
    c.send("/musicsteer/nothing", 1)
    c.send("/musicsteer/cfg", 1e9)  # clamped, not an error
    errors = c.replies(2.0, until=lambda r: len(r) >= 57)
    assert len([a for a, _ in errors if a == "/musicsteer/error"]) >= 56
    # a flood: 10,000 messages in about a second
    t0 = time.monotonic()
    for i in range(10_000):
        c.send("/musicsteer/concept/gmaj/strength", (i % 100) / 100)
        if i % 1000 == 999:
            time.sleep(max(0.0, t0 + (i + 1) / 10_000 - time.monotonic()))
    c.send("/musicsteer/concept/gmaj/strength", 0.42)
    time.sleep(1.0)
    assert producer.running and producer.error is None
    assert producer.stats().underruns == before
    assert producer.plan.strengths[1] == pytest.approx(0.42)  # order kept: the last one wins
    assert producer.sampling.cfg == 20.0


def test_oscsend_from_liblo_changes_a_strength_at_the_next_step(stream):
    port, holder, session = stream
    subprocess.run(["oscsend", "localhost", str(port), "/musicsteer/concept/gmaj/strength", "f", "0.8"],
                   check=True, timeout=10)
    deadline = time.monotonic() + 5
    while holder["p"].plan.strengths[1] != pytest.approx(0.8):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.2)  # the recorder syncs about once a second
    _, entries, _ = load_session(session)
    (entry,) = [e for e in entries if e["param"] == "concept/gmaj/strength" and e["value"] == pytest.approx(0.8)]
    assert entry["source"] == "osc" and 0 <= entry["step"] - entry["received_step"] <= 1


def test_live_cli_with_oscsend(tmp_path, tiny):
    """The whole command: `musicsteer live` in its own process, steered by oscsend."""
    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj"], tiny.cfg, "tiny").save(pack)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x",
                             "--null", "--seconds", "8", "--no-status", "--concepts", str(pack),
                             "--osc-port", str(port), "--record", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "s" / "tokens.npy").exists() or os.path.getsize(tmp_path / "s" / "tokens.npy") < 400:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        subprocess.run(["oscsend", "localhost", str(port), "/musicsteer/concept/cmaj/strength", "f", "0.6"],
                       check=True, timeout=10)
        subprocess.run(["oscsend", "localhost", str(port), "/musicsteer/concept/cmaj/strength", "s", "oops"],
                       check=True, timeout=10)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    info, entries, _ = load_session(tmp_path / "s")
    assert info["complete"]
    assert [(e["param"], e["value"]) for e in entries] == [("concept/cmaj/strength", pytest.approx(0.6))]
    assert "needs a number" in err  # the bad message was logged
    assert " 0 underruns" in out


def test_osc_starts_a_schedule_from_the_current_step(stream):
    from musicsteer.steering.schedules import ExpDecay, LinearDown, LinearUp, Started

    port, holder, _ = stream
    producer = holder["p"]
    c = Client(port)
    c.send("/musicsteer/concept/cmaj/strength", 0.5)
    time.sleep(0.2)
    sent = producer.step
    c.send("/musicsteer/concept/cmaj/schedule", "decay:0.9")
    time.sleep(0.3)
    schedule = producer.plan.schedules[0]
    assert isinstance(schedule, Started) and schedule.schedule == ExpDecay(0.9)
    assert sent <= schedule.start <= sent + 20
    c.send("/musicsteer/concept/cmaj/schedule", "crossfade:gmaj:2s")
    time.sleep(0.3)
    a, b = producer.plan.schedules
    assert a.schedule == LinearDown(100) and b.schedule == LinearUp(100) and a.start == b.start
    assert producer.plan.strengths[1] == pytest.approx(0.5)  # B takes A's strength when it had none


# -- scenes and panic ------------------------------------------------------------------------------

def test_router_stores_recalls_and_panics():
    from musicsteer.controllers.scenes import SceneBank

    cs = ControlState(["cmaj", "gmaj"])
    cs.seed("cfg", 3.0)
    r = OscRouter(cs, ["cmaj", "gmaj"], scenes=SceneBank(cs))
    r.handle("/musicsteer/concept/cmaj/strength", [0.6], ME)
    assert r.handle("/musicsteer/scene/store", ["A"], ME) == [("/musicsteer/scene/stored", ["A"])]
    assert r.query("scenes") == ("/musicsteer/scenes", ["A"])
    cs.take(0)
    r.handle("/musicsteer/scene/recall", ["A", 2], ME)  # an int is seconds too
    assert {c.param: (c.value, c.ramp_ms, c.source) for c in cs.take(1)} == {
        "concept/cmaj/strength": (0.6, 2000.0, "osc:A"), "cfg": (3.0, 2000.0, "osc:A")}
    assert r.handle("/musicsteer/panic", [0.0], ME) == [] and cs.take(2) == []  # a button's release
    r.handle("/musicsteer/panic", [], ME)
    assert {c.param: c.value for c in cs.take(3)} == {"concept/cmaj/strength": 0.0, "concept/gmaj/strength": 0.0}
    for address, args, message in [("/musicsteer/scene/recall", ["B"], "unknown scene 'B'; scenes: A"),
                                   ("/musicsteer/scene/recall", ["A", "slow"], "needs a number"),
                                   ("/musicsteer/scene/recall", ["A", -1.0], "transition"),
                                   ("/musicsteer/scene/recall", [], "takes a scene name"),
                                   ("/musicsteer/scene/store", [1], "needs a string"),
                                   ("/musicsteer/panic", ["now"], "needs a number")]:
        with pytest.raises(MusicsteerError, match=message):
            r.handle(address, args, ME)
    with pytest.raises(OscError, match="no scenes"):
        OscRouter(cs, ["cmaj"]).handle("/musicsteer/panic", [], ME)


def test_oscsend_stores_recalls_a_scene_and_panics(stream):
    port, holder, session = stream
    producer = holder["p"]

    def oscsend(*args):
        subprocess.run(["oscsend", "localhost", str(port), *args], check=True, timeout=10)

    oscsend("/musicsteer/concept/cmaj/strength", "f", "1.5")
    time.sleep(0.3)
    oscsend("/musicsteer/scene/store", "s", "loud")
    oscsend("/musicsteer/concept/cmaj/strength", "f", "0.1")
    time.sleep(0.3)
    oscsend("/musicsteer/scene/recall", "sf", "loud", "0.2")
    deadline = time.monotonic() + 5
    while producer.plan.strengths[0] != pytest.approx(1.5):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    oscsend("/musicsteer/panic")
    deadline = time.monotonic() + 5
    while list(producer.plan.strengths) != [0.0, 0.0]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.2)
    _, entries, _ = load_session(session)
    assert [e["ramp_ms"] for e in entries if e["source"] == "osc:loud" and e["param"] == "concept/cmaj/strength"] \
        == [pytest.approx(200.0)]
    assert any(e["source"] == "osc" and e["value"] == 0.0 and e["param"] == "concept/gmaj/strength" for e in entries)
