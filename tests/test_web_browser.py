"""The web page in a real browser: headless Chromium (Debian's `chromium`), driven
through the DevTools protocol over a WebSocket (aiohttp's client), opens the page of a
running `musicsteer live --model tiny --null --web 0` process, moves a fader with the
mouse and switches a scene with a click; the session's control log shows both, and the
page's meters and stats move. With MUSICSTEER_SCREENSHOT=1 it also writes
docs/web-surface.png (how the committed screenshot was made)."""

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from musicsteer.live.recorder import load_session
from musicsteer.steering.pack import ConceptPack

aiohttp = pytest.importorskip("aiohttp", reason="the web surface needs aiohttp (bash scripts/setup.sh installs it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[1] / "docs"
pytestmark = pytest.mark.slow


class DevTools:
    """One page target of a headless Chromium, spoken to over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    async def call(self, method, **params):
        mid = next(self.ids)
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def js(self, expression):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def until(self, expression, timeout=20.0):
        """`expression`'s value once it is truthy (an exception, as while the page loads, is not yet)."""
        end = time.monotonic() + timeout
        while True:
            try:
                value = await self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            assert time.monotonic() < end, f"timed out waiting for {expression}"
            await asyncio.sleep(0.1)

    async def click(self, x, y):
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def box(self, selector):
        """The centre and width of the element `selector` names, scrolled into view."""
        return await self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return {{x: r.left, y: r.top + r.height / 2, w: r.width}}; }})()""")


@pytest.fixture
def chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: bash scripts/setup.sh installs Debian's chromium")
    profile = tmp_path / "chromium"
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=1100,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < end, "chromium did not start"
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def live(tmp_path, tiny):
    """`musicsteer live --model tiny --null --web 0` with two concepts and a scenes file;
    yields (page url, session dir); stopped with SIGINT."""
    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny", seed=1).save(pack)
    scenes = tmp_path / "scenes.toml"
    scenes.write_text('[scene.calm]\n"concept/cmaj/strength" = 0.25\n"concept/gmaj/strength" = 1.5\ncfg = 2.0\n\n'
                      '[scene.wild]\n"concept/cmaj/strength" = 3.0\ncfg = 6.0\n')
    proc = subprocess.Popen([sys.executable, "-m", "musicsteer", "live", "--model", "tiny", "--prompt", "x",
                             "--null", "--no-status", "--no-osc", "--seconds", "120", "--buffer-ms", "150", "--concepts", str(pack),
                             "--scenes", str(scenes), "--record", str(tmp_path / "rec"), "--web", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        end = time.monotonic() + 120
        while not any("web surface at" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < end, "".join(lines)
            time.sleep(0.1)
        url = re.search(r"http://\S+", next(line for line in lines if "web surface at" in line)).group(0)
        yield url, tmp_path / "rec"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "".join(lines)
    assert out.startswith("played "), out  # its summary (underruns are test_web's business: Chromium starting
    # beside it on a loaded 2-core machine can starve it)


def test_chromium_moves_a_fader_and_switches_a_scene(chromium, live, tmp_path):
    url, rec = live

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{chromium}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = DevTools(ws)
                await page.call("Page.enable")
                await page.call("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1,
                                mobile=False)
                await page.call("Page.navigate", url=url)
                await page.until("document.querySelector('#status').textContent === 'connected'")
                await page.until("document.querySelector('[data-path=\"concept/cmaj/strength\"]') !== null")
                await page.until("document.querySelector('[data-scene=\"wild\"]') !== null")
                # meters and stats move: frames arrive and the meter readouts change
                f0 = int(await page.js("document.querySelector('#frames').textContent"))
                m0 = await page.js("document.querySelector('.meter[data-concept=cmaj] .fill').dataset.value")
                await asyncio.sleep(1.0)
                f1 = int(await page.js("document.querySelector('#frames').textContent"))
                m1 = await page.js("document.querySelector('.meter[data-concept=cmaj] .fill').dataset.value")
                assert f1 - f0 >= 10, (f0, f1)  # up to 50 a second
                assert m0 is not None and m1 is not None and m0 != m1
                assert await page.js("document.querySelector('#step-ms').textContent") != "–"
                # a click three quarters along the cmaj fader (its range is 0..1)
                b = await page.box('[data-path="concept/cmaj/strength"]')
                await page.click(b["x"] + 0.75 * b["w"], b["y"])
                assert abs(float(await page.js(
                    "document.querySelector('[data-path=\"concept/cmaj/strength\"]').value")) - 0.75) < 0.03
                await asyncio.sleep(0.5)
                b = await page.box('[data-scene="calm"]')
                await page.click(b["x"] + b["w"] / 2, b["y"])
                # the page follows the recall: the fader goes to the scene's value
                await page.until("Math.abs(document.querySelector('[data-path=\"concept/cmaj/strength\"]').value"
                                 " - 0.25) < 1e-3", timeout=10)
                await page.call("Runtime.evaluate", expression="window.scrollTo(0, 0)")
                await asyncio.sleep(0.5)
                shot = base64.b64decode((await page.call("Page.captureScreenshot", format="png"))["data"])
                assert shot[:8] == b"\x89PNG\r\n\x1a\n"
                (tmp_path / "web-surface.png").write_bytes(shot)
                # a phone: nothing wider than the screen
                await page.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                                mobile=True)
                await asyncio.sleep(0.3)
                assert await page.js("document.documentElement.scrollWidth") <= 390
    asyncio.run(asyncio.wait_for(go(), 120))
    time.sleep(1.5)  # the recorder writes the control log about once a second
    _, entries, _ = load_session(rec)
    fader = [e for e in entries if e["param"] == "concept/cmaj/strength" and e["source"].startswith("web:")
             and ":calm" not in e["source"]]
    recall = [e for e in entries if e["source"].endswith(":calm")]
    assert fader and abs(fader[-1]["value"] - 0.75) < 0.03, entries
    assert {e["param"]: e["value"] for e in recall} == {"concept/cmaj/strength": 0.25,
                                                          "concept/gmaj/strength": 1.5, "cfg": 2.0}
    assert recall[0]["step"] > fader[-1]["step"]
    if os.environ.get("MUSICSTEER_SCREENSHOT"):
        shutil.copy(tmp_path / "web-surface.png", DOCS / "web-surface.png")
