"""The web surface: the protocol's rules, who may connect (Host, Origin, token), and a
running `tiny` session driven over a real WebSocket (aiohttp's client): frames at up to
50 Hz, changes in the control log, bad input answered with errors while the music goes
on, a flood, two clients fighting, scenes and panic."""

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

from musicsteer.controllers.limits import MAX_MESSAGE_BYTES, RateLimit
from musicsteer.controllers.scenes import SceneBank
from musicsteer.controllers.state import ControlState
from musicsteer.controllers.web.access import Access
from musicsteer.controllers.web.protocol import WebError, WebRouter, decode
from musicsteer.live.recorder import load_session
from musicsteer.live.session import LiveRequest, start_session
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack

aiohttp = pytest.importorskip("aiohttp", reason="the web surface needs aiohttp (bash scripts/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the protocol ----------------------------------------------------------------------------------

def router():
    cs = ControlState(["cmaj", "gmaj"])
    cs.seed("cfg", 3.0)
    cs.seed("prompt", "lofi")
    return WebRouter(cs, ["cmaj", "gmaj"], SceneBank(cs)), cs


def test_messages_set_parameters_through_the_control_state():
    r, cs = router()
    assert r.handle(decode('{"set": "concept/cmaj/strength", "value": 0.5}')) == []
    assert r.handle(decode('{"prompt": 0, "text": "ambient pads"}'), source="web:2") == []
    assert r.handle(decode('{"prompt": 1, "text": "fast drums"}')) == []  # slot 1: the table's prompt/2
    assert r.handle(decode('{"set": "prompt/morph", "value": 0.25}')) == []
    assert r.handle(decode('{"get": "cfg"}')) == [{"path": "cfg", "value": 3.0}]
    changes = {c.param: c for c in cs.take(0)}
    assert changes["concept/cmaj/strength"].value == 0.5 and changes["prompt"].value == "ambient pads"
    assert changes["prompt/2"].value == "fast drums" and changes["prompt/morph"].value == 0.25
    assert changes["prompt"].source == "web:2"
    assert r.handle(decode('{"scene": "store", "name": "A"}')) == [{"stored": "A", "scenes": ["A"]}]
    r.handle(decode('{"set": "cfg", "value": 7}'))
    r.handle(decode('{"scene": "recall", "name": "A", "seconds": 1.5}'))
    r.handle(decode('{"panic": true}'))
    changes = {c.param: c for c in cs.take(1)}
    assert changes["cfg"].value == 3.0 and changes["cfg"].ramp_ms == 1500.0
    assert changes["concept/gmaj/strength"].value == 0.0 and changes["concept/gmaj/strength"].source == "web"
    paths = [p["path"] for p in r.describe()]
    assert {"prompt", "cfg", "topk", "concept/cmaj/strength", "concept/gmaj/schedule"} <= set(paths)


@pytest.mark.parametrize("data, message", [
    ("{", "not JSON"),
    (b"\x00\x01", "binary"),
    ("[1, 2]", "JSON object"),
    ('{"set": "cfg", "value": NaN}', "NaN is not a number"),
    ('{"set": "cfg", "value": Infinity}', "Infinity"),
    ('{"volume": 1}', "a message has one of"),
    ('{"set": "cfg", "value": 1, "extra": 2}', "unknown key 'extra'"),
    ("x" * (MAX_MESSAGE_BYTES + 1), "over the 65536 limit"),
    ("[" * 60_000, "not JSON"),  # nested too deep for the parser: an error, not a crash
])
def test_undecodable_messages_are_refused(data, message):
    with pytest.raises(WebError, match=message):
        decode(data)


@pytest.mark.parametrize("msg, message", [
    ({"set": "nothing", "value": 1}, "unknown parameter 'nothing'"),
    ({"set": "concept/nope/strength", "value": 1}, "unknown concept 'nope'"),
    ({"set": "cfg", "value": "high"}, "needs a number"),
    ({"set": "cfg", "value": 1e400}, "finite"),
    ({"set": "cfg"}, "no value"),
    ({"set": 3, "value": 1}, "parameter path"),
    ({"prompt": -1, "text": "x"}, "slot"),
    ({"prompt": 0, "text": ""}, "non-empty"),
    ({"prompt": 8, "text": "x"}, "unknown parameter 'prompt/9'"),  # 8 slots: 0..7
    ({"scene": "recall", "name": "nope"}, "unknown scene"),
    ({"scene": "recall", "name": 5}, "scene name"),
    ({"scene": "dance", "name": "A"}, "store\" or \"recall"),
    ({"get": "concept/cmaj/schedule"}, "event"),
])
def test_bad_messages_raise_one_line_errors(msg, message):
    r, cs = router()
    with pytest.raises(Exception, match=message) as exc:
        r.handle(msg)
    assert "\n" not in str(exc.value)
    assert cs.take(0) == []


def test_rate_limit_refuses_the_excess_and_warns_once_a_second():
    now = [0.0]
    limit = RateLimit(rate=100, burst=10, clock=lambda: now[0])
    assert sum(limit.allow() for _ in range(50)) == 10  # the burst, then nothing until time passes
    assert limit.warn() and not limit.warn()
    now[0] += 0.5
    assert sum(limit.allow() for _ in range(100)) == 10  # capped at the burst again
    now[0] += 1.0
    assert limit.warn()


# -- who may connect -------------------------------------------------------------------------------

def test_loopback_needs_no_token_but_its_own_host_and_origin():
    a = Access.make("127.0.0.1", 8080)
    assert a.token is None and a.url() == "http://127.0.0.1:8080/"
    assert a.check_socket("127.0.0.1:8080", "http://127.0.0.1:8080", None) is None
    assert a.check_socket("localhost:8080", "http://localhost:8080", None) is None
    assert a.check_socket("127.0.0.1:8080", None, None) is None  # no Origin: not a browser page
    assert "Origin 'http://evil.example'" in a.check_socket("127.0.0.1:8080", "http://evil.example", None)
    assert "Origin" in a.check_socket("127.0.0.1:8080", "http://localhost:8080", None)  # not the Host it asked
    assert "Host 'evil.example:8080'" in a.check_socket("evil.example:8080", "http://evil.example:8080", None)
    assert "Host" in a.check_socket("127.0.0.1:9999", None, None)


def test_another_address_needs_the_token_it_printed():
    a = Access.make("192.0.2.7", 8080)
    assert a.token and len(a.token) >= 20 and a.url().endswith(f"?token={a.token}")
    good = ("192.0.2.7:8080", "http://192.0.2.7:8080")
    assert a.check_socket(*good, a.token) is None
    assert "token" in a.check_socket(*good, None)
    assert "token" in a.check_socket(*good, a.token[:-1] + "x")
    assert Access.make("192.0.2.7", 8080).token != a.token  # fresh each start


# -- a running session -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def session(tiny, tmp_path_factory):
    """A live tiny session (null sink, real time) with two concepts, scenes in a file,
    the web surface on a free port and a recording; yields (parts, url)."""
    tmp = tmp_path_factory.mktemp("web")
    pack = tmp / "pack"
    ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny", seed=1).save(pack)
    (tmp / "scenes.toml").write_text('[scene.calm]\n"concept/cmaj/strength" = 0.25\ncfg = 2.0\n')
    request = LiveRequest("warm lofi piano", SamplingSettings(seed=2), null="realtime", concepts=pack,
                          record=tmp / "rec", scenes=tmp / "scenes.toml", web_port=free_port(), status=False,
                          buffer_ms=150)
    parts = start_session(tiny, request)
    try:
        yield parts, f"http://127.0.0.1:{parts.web.port}", tmp
    finally:
        parts.finish(drain=False)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(http, url, **kw):
    ws = await http.ws_connect(url + "/ws", **kw)
    hello = json.loads((await ws.receive(timeout=10)).data)
    return ws, hello["hello"]


async def replies(ws, seconds, want=lambda m: True):
    """The messages (not frames) received within `seconds`, and how many frames came."""
    out, frames, end = [], 0, time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        data = json.loads(msg.data)
        if "meters" in data:
            frames += 1
        elif want(data):
            out.append(data)
    return out, frames


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_the_page_and_its_files_are_served(session):
    parts, url, _ = session

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/") as r:
                page = await r.text()
                assert r.status == 200 and "/static/app.js" in page and 'name="viewport"' in page
            async with http.get(url + "/static/app.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
            async with http.get(url + "/static/../../osc.py") as r:
                assert r.status == 404
            async with http.get(url + "/", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 403  # a rebound name is not this server
    run(go())


def test_frames_meters_and_a_fader_in_the_control_log(session):
    parts, url, tmp = session

    async def go():
        async with aiohttp.ClientSession() as http:
            ws, hello = await connect(http, url)
            assert hello["concepts"] == ["cmaj", "gmaj"] and hello["scenes"] == ["calm"]
            assert hello["values"]["cfg"] == 3.0 and hello["token"] is False
            t0 = time.monotonic()
            _, frames = await replies(ws, 1.0)
            rate = frames / (time.monotonic() - t0)
            assert 10 <= rate <= 55, rate  # up to 50 a second (fewer on a loaded machine)
            await ws.send_str(json.dumps({"set": "concept/gmaj/strength", "value": 0.8}))
            frame = None
            while frame is None or "values" not in frame or frame["values"].get("concept/gmaj/strength") != 0.8:
                frame = json.loads((await ws.receive(timeout=5)).data)
            assert set(frame["meters"]) == {"cmaj", "gmaj"} and len(frame["spectrum"]) == 32
            assert frame["stats"]["running"] and frame["level"]["rms"] >= 0
            await ws.close()
    run(go())
    wait_for(lambda: parts.producer.plan.strengths[1] == pytest.approx(0.8))
    wait_for(lambda: any(e["param"] == "concept/gmaj/strength" and e["value"] == 0.8
                         for e in load_session(tmp / "rec")[1]), 5)
    (entry,) = [e for e in load_session(tmp / "rec")[1] if e["param"] == "concept/gmaj/strength" and e["value"] == 0.8]
    assert entry["source"].startswith("web:")


def test_bad_input_gets_errors_and_the_music_goes_on(session):
    parts, url, _ = session
    producer = parts.producer
    before = producer.stats().underruns
    bad = ["{", "[1]", "null", '{"set": "cfg", "value": NaN}', '{"set": "nothing", "value": 1}',
           '{"set": "concept/nope/strength", "value": 1}', '{"set": "cfg", "value": "loud"}', '{"hello": 1}',
           "x" * (MAX_MESSAGE_BYTES + 10)]

    async def go():
        async with aiohttp.ClientSession() as http:
            ws, _ = await connect(http, url)
            for text in bad:
                await ws.send_str(text)
            await ws.send_bytes(b"\xff\x00junk")
            errors, _ = await replies(ws, 3.0, want=lambda m: "error" in m)
            assert len(errors) == len(bad) + 1, errors
            # a message far over the limit closes only that connection (1009); the next one works
            await ws.send_str("y" * (20 * MAX_MESSAGE_BYTES))
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:  # meters the server sent before it closed are still in flight
                msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1009
            ws, _ = await connect(http, url)
            # 1,000 messages a second for 2 s, then one that must win
            t0 = time.monotonic()
            for i in range(2000):
                await ws.send_str(json.dumps({"set": "concept/cmaj/strength", "value": (i % 100) / 100}))
                if i % 100 == 99:
                    await asyncio.sleep(max(0.0, t0 + (i + 1) / 1000 - time.monotonic()))
            await ws.send_str(json.dumps({"set": "concept/cmaj/strength", "value": 0.42}))
            errors, frames = await replies(ws, 1.0, want=lambda m: "error" in m)
            assert errors == [] and frames > 10
            await ws.close()
    run(go())
    wait_for(lambda: producer.plan.strengths[0] == pytest.approx(0.42))
    assert producer.running and producer.error is None
    assert producer.stats().underruns == before
    assert parts.web.stats().errors >= len(bad) + 1


def test_two_clients_fighting_both_see_the_last_word(session):
    parts, url, _ = session

    async def go():
        async with aiohttp.ClientSession() as http:
            a, _ = await connect(http, url)
            b, _ = await connect(http, url)
            for i in range(200):  # interleaved: each sets the other's fader back
                await a.send_str(json.dumps({"set": "cfg", "value": 4.0 + (i % 7) / 10}))
                await b.send_str(json.dumps({"set": "cfg", "value": 6.0 - (i % 5) / 10}))
            await asyncio.sleep(0.2)
            await b.send_str(json.dumps({"set": "cfg", "value": 5.5}))
            for ws in (a, b):  # both pages are told the value that won
                while True:
                    data = json.loads((await ws.receive(timeout=5)).data)
                    if data.get("values", {}).get("cfg") == 5.5:
                        break
            await a.close()
            await b.close()
    run(go())
    wait_for(lambda: parts.producer.sampling.cfg == pytest.approx(5.5, abs=1e-6))
    assert parts.web.stats().connections == 0 or True  # closing is asynchronous; the next test reconnects


def test_scenes_and_panic_over_the_socket(session):
    parts, url, tmp = session

    async def go():
        async with aiohttp.ClientSession() as http:
            ws, _ = await connect(http, url)
            await ws.send_str(json.dumps({"set": "concept/gmaj/strength", "value": 1.5}))
            await asyncio.sleep(0.2)
            await ws.send_str(json.dumps({"scene": "store", "name": "loud"}))
            got, _ = await replies(ws, 2.0, want=lambda m: "stored" in m)
            assert got == [{"stored": "loud", "scenes": ["calm", "loud"]}]
            await ws.send_str(json.dumps({"scene": "recall", "name": "calm", "seconds": 0}))
            await asyncio.sleep(0.3)
            assert parts.producer.plan.strengths[0] == pytest.approx(0.25)
            await ws.send_str(json.dumps({"panic": True}))
            await asyncio.sleep(0.3)
            await ws.close()
    run(go())
    assert list(parts.producer.plan.strengths) == [0.0, 0.0]
    assert "[scene.loud]" in (tmp / "scenes.toml").read_text()  # the store wrote the file
    assert "concept/gmaj/strength\" = 1.5" in (tmp / "scenes.toml").read_text()


def test_foreign_origin_and_wrong_host_are_refused(session):
    parts, url, _ = session

    async def go():
        async with aiohttp.ClientSession() as http:
            for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                            {"Host": "evil.example:80", "Origin": "http://evil.example:80"}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                    await http.ws_connect(url + "/ws", headers=headers)
                assert exc.value.status == 403
            ws, _ = await connect(http, url, headers={"Origin": url})  # its own page's Origin
            await ws.close()
    run(go())
    assert parts.producer.running


def test_a_token_is_required_off_loopback(tiny):
    """Bound to another address (the machine's own name for it): the token is printed,
    and a socket without it, or with a wrong one, is refused."""
    from musicsteer.controllers.web.server import WebServer

    cs = ControlState(["cmaj"])
    access = Access.make("0.0.0.0", 0)
    server = WebServer(WebRouter(cs, ["cmaj"], SceneBank(cs)), access, lambda: {"meters": {}, "stats": {}}).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async def go():
            async with aiohttp.ClientSession() as http:
                for token in (None, "nope"):
                    q = f"?token={token}" if token else ""
                    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                        await http.ws_connect(f"{base}/ws{q}")
                    assert exc.value.status == 403
                ws = await http.ws_connect(f"{base}/ws?token={access.token}", headers={"Origin": base})
                hello = json.loads((await ws.receive(timeout=5)).data)["hello"]
                assert hello["token"] is True
                await ws.send_str(json.dumps({"set": "concept/cmaj/strength", "value": 0.3}))
                await asyncio.sleep(0.2)
                await ws.close()
        run(go())
    finally:
        server.stop()
    assert [c.value for c in cs.take(0)] == [0.3]
    assert server.stats().refused == 2 and server.url.endswith(f"?token={access.token}")


def test_live_cli_prints_the_address_and_refuses_a_busy_port(tmp_path, tiny):
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x",
                               "--null", "--seconds", "1", "--no-status", "--no-osc", "--web", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"musicsteer: error: cannot serve the web surface on "
                                                           f"127.0.0.1:{port}")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scene.a]\ncfg = 2.0\ntopk = \"many\"\n")
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x",
                           "--null", "--seconds", "1", "--no-status", "--no-osc", "--scenes", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"musicsteer: error: {bad}, line 3: scene 'a': topk needs a number, got str"


def test_a_fader_sweep_from_the_page_replays_to_the_same_tokens(tiny, tmp_path):
    """Changes from the socket are in the control log like OSC's: a recorded session with a
    sweep of cfg and a strength, and a scene recall, replays to the same tokens."""
    from musicsteer.live.session import replay

    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj"], tiny.cfg, "tiny", seed=4).save(pack)
    request = LiveRequest("warm lofi piano", SamplingSettings(seed=5), null="realtime", concepts=pack, seconds=3.0,
                          record=tmp_path / "rec", web_port=0, status=False, buffer_ms=150, osc_smooth_ms=40)
    parts = start_session(tiny, request)
    try:
        url = f"http://127.0.0.1:{parts.web.port}"

        async def go():
            async with aiohttp.ClientSession() as http:
                ws, _ = await connect(http, url)
                for i in range(40):
                    await ws.send_str(json.dumps({"set": "concept/cmaj/strength", "value": i / 20}))
                    await ws.send_str(json.dumps({"set": "cfg", "value": 1.0 + i / 10}))
                    if i == 20:
                        await ws.send_str(json.dumps({"scene": "store", "name": "mid"}))
                    await asyncio.sleep(0.02)
                await ws.send_str(json.dumps({"scene": "recall", "name": "mid", "seconds": 0.3}))
                await ws.close()
        run(go())
        wait_for(lambda: not parts.producer.running, 30)
    finally:
        parts.finish(drain=False)
    _, entries, recorded = load_session(tmp_path / "rec")
    sources = {e["source"].split(":")[0] for e in entries}
    assert sources == {"web"} and len(entries) > 40
    assert any(e.get("smooth_ms") == 40 for e in entries) and any(e.get("ramp_ms") == 300.0 for e in entries)
    tokens, _, _ = replay(tiny, tmp_path / "rec")
    np.testing.assert_array_equal(tokens, recorded)
