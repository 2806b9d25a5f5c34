"""A real JACK server on the dummy backend, for tests that need an audio or MIDI device.

`jackd -d dummy` is a real-time-paced audio device that needs no hardware: its clock
runs one period at a time (256 frames at 32 kHz = 8 ms by default), PortAudio sees it
as the "JACK Audio Connection Kit" host API, and its example clients (`jack_rec`,
`jack_lsp`, `jack_connect`) record and route what is played. It is also the MIDI router
for mido's rtmidi backend (`UNIX_JACK` API).

Each server gets a unique name (``musicsteer-<pid>-<n>``), so a server left behind by a
crashed run can never be mistaken for ours. While a server is entered, the process
environment points every new JACK client at it (``JACK_DEFAULT_SERVER``), which is how
in-process clients (PortAudio, rtmidi) find it; child processes get the same variables
from `JackServer.env`. A record of each running server is kept in a state directory;
starting a server first reaps servers whose owning test process has died.

Running as root in a container: the server runs with ``--no-realtime`` (no SCHED_FIFO),
``JACK_NO_AUDIO_RESERVATION=1`` (no D-Bus device reservation), and clients get
``JACK_NO_START_SERVER=1`` so a missing server is an error, never an auto-started one.
jackd2 has no mlock option (that was jackd1's ``-m``).

Teardown first closes this process's PortAudio JACK client (`release_in_process_clients`):
terminating PortAudio after its server died aborts the process. Tests that open other
in-process JACK clients (rtmidi) must close them before the server goes.

When jackd is not installed the helper raises `JackServerError` with what to install; the
audio tests must fail then, not skip (the project's setup installs the Debian packages).

Usage::

    with jack_dummy_server(sample_rate=32000, period=256) as jack:
        ...  # PortAudio / rtmidi clients opened here connect to `jack.name`

    jack = jack_server_fixture(scope="module")  # a pytest fixture, in a test module
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

JACK_TOOLS = ("jackd", "jack_lsp", "jack_connect", "jack_rec")
DEBIAN_HINT = "install the Debian package jackd2 (bash scripts/setup.sh installs everything)"
CLIENT_ENV = {"JACK_NO_AUDIO_RESERVATION": "1", "JACK_NO_START_SERVER": "1"}
STATE_DIR = Path(tempfile.gettempdir()) / "musicsteer-jack"

_counter = itertools.count()


class JackServerError(RuntimeError):
    pass


@dataclass(frozen=True)
class JackServer:
    """A running jackd; `env` is what a child JACK client needs to find it."""

    name: str
    sample_rate: int
    period: int
    pid: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def period_s(self) -> float:
        return self.period / self.sample_rate

    def tool(self, *args: str, timeout: float = 10.0, check: bool = True) -> str:
        """Run a JACK command-line client against this server; returns its stdout."""
        proc = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise JackServerError(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        return proc.stdout

    def ports(self, pattern: str = "", *flags: str) -> list[str]:
        """Port names (jack_lsp); flags such as "-o" (outputs) or "-i" (inputs)."""
        out = self.tool("jack_lsp", *flags, *([pattern] if pattern else []))
        return [line for line in out.splitlines() if line and not line.startswith(" ")]

    def connections(self, port: str) -> list[str]:
        """The ports connected to `port`."""
        out = self.tool("jack_lsp", "-c", port)
        return [line.strip() for line in out.splitlines() if line.startswith(" ")]

    def xruns(self) -> int:
        """The xruns the server has logged so far ("JackEngine::XRun: client = ... was not
        finished"). A late client can drop a period of the graph without every client being
        told: PortAudio may see no paOutputUnderflow for it, the log always has it."""
        return self.log_path.read_text(errors="replace").count("JackEngine::XRun")

    def record(self, path: Path, seconds: int, ports: list[str]) -> subprocess.Popen:
        """Start `jack_rec` recording `ports` to a 32-bit PCM WAV for `seconds`.

        jack_rec takes whole seconds (2.8 records 2 s); it connects to the ports itself,
        a few tens of ms after it starts: wait for the connection before playing.

        jack_rec is a separate process (JACK's own example client), so what it writes is
        what the JACK graph carried, independent of this process's threads and GIL.
        The caller waits on the returned process (it exits when the duration is done).
        """
        if int(seconds) != seconds or seconds < 1:
            raise ValueError(f"jack_rec records whole seconds, not {seconds}")
        cmd = ["jack_rec", "-f", str(path), "-d", str(int(seconds)), "-b", "32", *ports]
        return subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )


def require_jack_tools() -> None:
    missing = [t for t in JACK_TOOLS if shutil.which(t) is None]
    if missing:
        raise JackServerError(f"JACK tools not found ({', '.join(missing)}): {DEBIAN_HINT}")


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _is_our_jackd(pid: int, name: str) -> bool:
    """True if `pid` is still the jackd we started under `name` (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"jackd") and name.encode() in argv


def _terminate(pid: int, name: str, grace_s: float = 3.0) -> None:
    if not _is_our_jackd(pid, name):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _is_our_jackd(pid, name):
        time.sleep(0.02)
    if _is_our_jackd(pid, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _remove_shm(name)


def _remove_shm(name: str) -> None:
    """Remove the sockets and semaphores a killed server of this name left in /dev/shm."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    for p in shm.glob(f"jack*_{name}_*"):
        with contextlib.suppress(OSError):
            p.unlink()


def reap_stale_servers() -> list[str]:
    """Stop servers recorded by test processes that have died; returns their names."""
    reaped = []
    if not STATE_DIR.is_dir():
        return reaped
    for rec in STATE_DIR.glob("*.json"):
        try:
            info = json.loads(rec.read_text())
            owner, pid, name = int(info["owner"]), int(info["pid"]), str(info["name"])
        except (OSError, ValueError, KeyError):
            rec.unlink(missing_ok=True)
            continue
        if _alive(owner):
            continue
        _terminate(pid, name)
        rec.unlink(missing_ok=True)
        rec.with_suffix(".log").unlink(missing_ok=True)
        reaped.append(name)
    return reaped


def release_in_process_clients() -> None:
    """Close this process's PortAudio JACK client before its server goes away.

    PortAudio keeps one JACK client from initialisation to termination; terminating it
    after the server died aborts the process (an assertion in pa_jack.c), at the latest
    at exit. Other in-process clients (rtmidi's) must be closed by their tests.
    """
    sink = sys.modules.get("musicsteer.live.portaudio_sink")
    if sink is not None:
        sink.release_portaudio()  # raises if a PortAudioSink is still open
        return
    sd = sys.modules.get("sounddevice")
    while sd is not None and sd._initialized:
        sd._terminate()


def _wait_ready(proc: subprocess.Popen, name: str, env: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise JackServerError(f"jackd exited with status {proc.returncode}")
        ls = subprocess.run(["jack_lsp"], env=env, capture_output=True, text=True)
        if ls.returncode == 0 and "system:playback_1" in ls.stdout:
            return
        time.sleep(0.05)
    raise JackServerError(f"jackd '{name}' not ready after {timeout:.0f} s")


@contextlib.contextmanager
def jack_dummy_server(
    sample_rate: int = 32000,
    period: int = 256,
    playback_ports: int = 2,
    capture_ports: int = 2,
    set_default: bool = True,
    timeout: float = 10.0,
) -> Iterator[JackServer]:
    """Start `jackd -d dummy` under a unique name, wait until clients can connect, yield.

    With `set_default`, os.environ points new in-process JACK clients at this server
    for the duration (and is restored afterwards). Teardown sends SIGTERM, then SIGKILL
    after 3 s, and removes what the server left in /dev/shm.
    """
    require_jack_tools()
    reap_stale_servers()
    name = f"musicsteer-{os.getpid()}-{next(_counter)}"
    env = {**os.environ, **CLIENT_ENV, "JACK_DEFAULT_SERVER": name}
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / f"{name}.log"
    cmd = [
        "jackd", "--no-realtime", "--name", name,
        "-d", "dummy", "--rate", str(sample_rate), "--period", str(period),
        "--playback", str(playback_ports), "--capture", str(capture_ports),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    record = STATE_DIR / f"{name}.json"
    record.write_text(json.dumps({"owner": os.getpid(), "pid": proc.pid, "name": name}))
    saved = {k: os.environ.get(k) for k in (*CLIENT_ENV, "JACK_DEFAULT_SERVER")}
    try:
        try:
            _wait_ready(proc, name, env, timeout)
        except JackServerError as e:
            raise JackServerError(f"{e}; log:\n{log_path.read_text()[-2000:]}") from None
        if set_default:
            os.environ.update(CLIENT_ENV)
            os.environ["JACK_DEFAULT_SERVER"] = name
        yield JackServer(name, sample_rate, period, proc.pid, log_path, env)
    finally:
        try:
            release_in_process_clients()
        finally:
            _stop_server(proc, name, record, log_path, saved if set_default else None)


def _stop_server(
    proc: subprocess.Popen, name: str, record: Path, log_path: Path, saved: dict | None
) -> None:
    if saved is not None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _terminate(proc.pid, name)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)  # reap the zombie
    record.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)


def jack_server_fixture(scope: str = "module", **server_kwargs):
    """A pytest fixture yielding a `JackServer`; assign it to a name in a test module."""

    @pytest.fixture(scope=scope)
    def jack_server() -> Iterator[JackServer]:
        with jack_dummy_server(**server_kwargs) as server:
            yield server

    return jack_server
