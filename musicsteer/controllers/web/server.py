"""Threading model: `WebServer.start` (the controlling thread) starts one thread that
runs an asyncio event loop; the page, every WebSocket, the router and the frame
broadcaster run on that loop alone. `frame()` (given at construction) is called from
the loop about 50 times a second while a client is connected and must not block;
`stop` (the controlling thread) ends the loop and joins the thread.

The web surface's transport: aiohttp serving the page (index.html and its static
files) and one WebSocket at /ws. Each connection reads JSON messages in order, under
the size and rate limits (limits.py), hands them to the router (protocol.py) and gets
the replies back; errors are replied as {"error": ...}, logged and counted, and the
connection stays open. Frames go out to every connection at up to `frame_hz`; a
connection that cannot keep up skips frames rather than holding the others back.
Who may connect is `Access`'s rule (access.py). aiohttp is imported when the server is
built, so importing this module costs nothing.

The server knows nothing of parameters or the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from ...errors import MusicsteerError
from ..limits import MAX_MESSAGE_BYTES, RateLimit
from .access import Access
from .protocol import WebError, WebRouter, decode

log = logging.getLogger("musicsteer.web")
STATIC = ("index.html", "app.js", "style.css")
TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
MAX_QUEUED = 1000  # replies waiting for one connection
CLOSE_AT = 16 * MAX_MESSAGE_BYTES  # larger messages close the connection (1009); smaller ones over the limit get an error


@dataclass(frozen=True)
class WebStats:
    connections: int  # open now
    accepted: int  # connections let in since start
    refused: int  # connections refused (Host, Origin, token)
    received: int
    errors: int  # messages answered with an error (bad input, over the limits)
    frames: int  # frames sent (to all connections together)


class WebServer:
    def __init__(self, router: WebRouter, access: Access, frame: Callable[[], dict],
                 frame_hz: float = 50.0, rate_limit: Callable[[], RateLimit] = RateLimit) -> None:
        self.router, self.access, self.frame, self.frame_hz = router, access, frame, frame_hz
        self.rate_limit = rate_limit
        self.port = access.port
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self.accepted = self.refused = self.received = self.errors = self.frames = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._page = {name: resources.files(__package__).joinpath("static", name).read_bytes() for name in STATIC}

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self._run, name="musicsteer-web", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            self._thread.join(5)
            raise self._failure
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    @property
    def watched(self) -> bool:
        """Whether a client is connected now (any thread: one read of a dict's size)."""
        return bool(self._clients)

    def stats(self) -> WebStats:
        return WebStats(len(self._clients), self.accepted, self.refused, self.received, self.errors, self.frames)

    @property
    def url(self) -> str:
        return self.access.url()

    # -- the loop's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), or logged after it returned
            if not self._ready.is_set():
                self._failure = exc if isinstance(exc, MusicsteerError) else WebError(f"web surface failed: {exc}")
                self._ready.set()
            else:
                log.exception("the web surface stopped")

    async def _serve(self) -> None:
        from aiohttp import web  # lazy: only a session with --web pays for it

        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
        app.add_routes([web.get("/", self._index), web.get("/static/{name}", self._static),
                        web.get("/ws", self._socket)])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.access.host, self.access.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise WebError(f"cannot serve the web surface on {self.access.host}:{self.access.port}: "
                               f"{exc.strerror or exc}") from None
            if self.access.port == 0:
                port = runner.addresses[0][1]
                self.access = Access(self.access.host, port, self.access.token)
                self.port = port
            self._ready.set()
            broadcaster = asyncio.create_task(self._broadcast())
            await self._stopping.wait()
            broadcaster.cancel()
            for client in list(self._clients.values()):
                await client.ws.close(code=1001, message=b"the session ended")
        finally:
            await runner.cleanup()

    # -- the page ---------------------------------------------------------------------------

    def _refuse_host(self, request):
        from aiohttp import web

        why = self.access.check_host(request.headers.get("Host"))
        if why:
            self.refused += 1
            log.warning("web: refused %s from %s: %s", request.path, request.remote, why)
            return web.Response(status=403, text=why + "\n")
        return None

    async def _index(self, request):
        from aiohttp import web

        return self._refuse_host(request) or web.Response(body=self._page["index.html"], content_type="text/html",
                                                          headers={"Cache-Control": "no-store"})

    async def _static(self, request):
        from aiohttp import web

        refused = self._refuse_host(request)
        if refused:
            return refused
        name = request.match_info["name"]
        if name not in self._page:
            raise web.HTTPNotFound()
        return web.Response(body=self._page[name], content_type=TYPES[name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": "no-store"})

    # -- one WebSocket ---------------------------------------------------------------------

    async def _socket(self, request):
        from aiohttp import WSMsgType, web

        why = self.access.check_socket(request.headers.get("Host"), request.headers.get("Origin"),
                                       request.query.get("token"))
        if why:
            self.refused += 1
            log.warning("web: refused a WebSocket from %s: %s", request.remote, why)
            return web.Response(status=403, text=why + "\n")
        ws = web.WebSocketResponse(max_msg_size=CLOSE_AT, heartbeat=20.0)
        await ws.prepare(request)
        cid = next(self._ids)
        client = _Client(cid, ws, self.rate_limit())
        self._clients[cid] = client
        self.accepted += 1
        sender = asyncio.create_task(client.send_loop())
        log.info("web: client %d connected from %s", cid, request.remote)
        try:
            client.push(self.router.hello(self.access.token is not None))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._message(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._message(client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    log.warning("web: client %d: %s", cid, ws.exception())
        finally:
            self._clients.pop(cid, None)
            sender.cancel()
            log.info("web: client %d left", cid)
        return ws

    def _message(self, client: _Client, data) -> None:
        self.received += 1
        if not client.limit.allow():
            self.errors += 1
            if client.limit.warn():
                log.warning("web: client %d is over %d messages a second; refusing the excess",
                            client.id, int(client.limit.rate))
                client.push({"error": f"over {int(client.limit.rate)} messages a second: "
                                      f"{client.limit.refused} refused so far"})
            return
        try:
            for reply in self.router.handle(decode(data), source=f"web:{client.id}"):
                client.push(reply)
        except (MusicsteerError, ValueError, TypeError) as exc:  # bad input, never a dead connection
            self.errors += 1
            text = str(exc)[:500]
            log.warning("web: client %d: %s", client.id, text)
            client.push({"error": text})

    async def _broadcast(self) -> None:
        period = 1.0 / self.frame_hz
        generation, scenes = -1, None
        while True:
            await asyncio.sleep(period)
            if not self._clients:
                continue
            try:
                frame = self.frame()
            except Exception:  # a frame is lost, never the broadcaster
                self.errors += 1
                log.exception("web: building a frame failed")
                continue
            gen = self.router.controls.generation
            if gen != generation:
                generation, frame["values"] = gen, self.router.values()
            names = self.router.scenes.names() if self.router.scenes is not None else []
            if names != scenes:
                scenes = frame["scenes"] = names
            text = json.dumps(frame)
            for client in list(self._clients.values()):
                client.frame(text)
                self.frames += 1


class _Client:
    """One connection's outbox: replies in order, and the newest frame (older ones are dropped)."""

    def __init__(self, cid: int, ws, limit: RateLimit) -> None:
        self.id, self.ws, self.limit = cid, ws, limit
        self._replies: list[str] = []
        self._frame: str | None = None
        self._wake = asyncio.Event()

    def push(self, reply: dict) -> None:
        if len(self._replies) >= MAX_QUEUED:  # a client that sends and never reads loses its oldest replies
            del self._replies[0]
        self._replies.append(json.dumps(reply))
        self._wake.set()

    def frame(self, text: str) -> None:
        self._frame = text
        self._wake.set()

    async def send_loop(self) -> None:
        while not self.ws.closed:
            await self._wake.wait()
            self._wake.clear()
            out, self._replies = self._replies, []
            if self._frame is not None:
                out.append(self._frame)
                self._frame = None
            for text in out:
                try:
                    await self.ws.send_str(text)
                except (ConnectionError, RuntimeError):
                    return
