"""OSC from the outside for tests: a free port, a UDP client that sends messages and reads the
replies sent back to it, and a live session running in a thread with OSC on (test_osc.py,
test_demo_model.py)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from musicsteer.controllers.state import ControlState
from musicsteer.live.session import LiveRequest, run_live
from musicsteer.model.sampling import SamplingSettings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message(address, *args) -> bytes:
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build().dgram


class Client:
    """A UDP socket that sends OSC and reads the replies sent back to it."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)

    def send(self, address, *args):
        self.sock.sendto(message(address, *args), ("127.0.0.1", self.port))

    def raw(self, data: bytes):
        self.sock.sendto(data, ("127.0.0.1", self.port))

    def replies(self, seconds=0.5, until=None):
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            m = OscMessage(data)
            out.append((m.address, list(m.params)))
            if until is not None and until(out):
                break
        return out


@contextmanager
def live_session(model, tmp_path, concepts, names, prompt="warm lofi piano", seed=2, **request):
    """A real-time live session of `model` with the pack `concepts` (its concepts `names`), OSC on a
    free port and a recording, run in a thread until the block ends; yields (port, holder, session),
    holder["p"] the producer once its first 20 steps are done."""
    port = free_port()
    controls = ControlState(list(names))
    stop = threading.Event()
    holder = {}
    request = LiveRequest(prompt, SamplingSettings(seed=seed), null="realtime", concepts=concepts,
                          record=tmp_path / "session", osc_port=port, status=False, **request)
    thread = threading.Thread(target=lambda: holder.update(
        result=run_live(model, request, controls=controls, stop=stop, on_start=lambda p: holder.update(p=p))))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "p" not in holder or holder["p"].step < 20:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        yield port, holder, tmp_path / "session"
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()
