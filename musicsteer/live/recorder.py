"""Threading model: the producer thread calls `frame`, `audio` and `control`, which
only put items on a queue; the writer thread owns every file. `close` (any thread,
once) drains the queue and finalises the files.

Session recording: a directory that replays to the same tokens.

  audio.wav       16-bit PCM of the music the producer emitted, header kept valid
  tokens.npy      int64 [4, frames] (stored column-major, so frames append at the end)
  controls.jsonl  one line per control change: {"step", "param", "value", "source"}
  session.json    model, prompt, seed, sampling and steering settings, version; totals at the end

Files are flushed and synced about once a second by a writer thread, so a session
killed at any moment leaves files that load, missing at most the last second.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import wave
from pathlib import Path

import numpy as np

from ..errors import MusicsteerError

NPY_HEADER = 128  # bytes, fixed so the shape can be rewritten in place


class RecordingError(MusicsteerError):
    pass


class TokenFile:
    """A .npy of int64 [K, frames] that grows by whole frames (Fortran order)."""

    def __init__(self, path: Path, codebooks: int) -> None:
        self.path, self.K, self.frames = path, codebooks, 0
        self.f = open(path, "wb")
        self._write_header()

    def _write_header(self) -> None:
        head = "{'descr': '<i8', 'fortran_order': True, 'shape': (%d, %d), }" % (self.K, self.frames)
        head = head.ljust(NPY_HEADER - 10 - 1) + "\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode("latin1"))
        self.f.seek(0, os.SEEK_END)

    def append(self, frame: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(frame, dtype="<i8").tobytes())
        self.frames += 1

    def sync(self) -> None:
        self._write_header()
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.sync()
        self.f.close()


class SessionRecorder:
    def __init__(self, directory: Path, info: dict, codebooks: int, sample_rate: int) -> None:
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if any(directory.iterdir()):
                raise RecordingError(f"--record {directory}: the directory is not empty; "
                                     f"choose a new one so no earlier session is overwritten")
            self.info = dict(info, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=False)
            (directory / "session.json").write_text(json.dumps(self.info, indent=2) + "\n")
            self.tokens = TokenFile(directory / "tokens.npy", codebooks)
            self.wav = wave.open(str(directory / "audio.wav"), "wb")
            self.controls = open(directory / "controls.jsonl", "w")
        except OSError as exc:
            raise RecordingError(f"cannot record into {directory}: {exc}") from exc
        self.wav.setnchannels(1)
        self.wav.setsampwidth(2)
        self.wav.setframerate(sample_rate)
        self.directory = directory
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="musicsteer-recorder", daemon=True)
        self._closed = False
        self._thread.start()

    # -- producer side: enqueue only ---------------------------------------------------

    def frame(self, codes: np.ndarray) -> None:
        self._queue.put(("frame", codes))

    def audio(self, samples: np.ndarray) -> None:
        self._queue.put(("audio", samples))

    def control(self, entry: dict) -> None:
        self._queue.put(("control", entry))

    # -- writer thread -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            try:
                kind, item = self._queue.get(timeout=0.25)
            except queue.Empty:
                kind, item = None, None
            if kind == "stop":
                break
            if kind == "frame":
                self.tokens.append(item)
            elif kind == "audio":
                pcm = (np.clip(item, -1.0, 1.0) * 32767.0).astype("<i2")
                self.wav.writeframes(pcm.tobytes())  # wave rewrites the header sizes on each write
            elif kind == "control":
                self.controls.write(json.dumps(item) + "\n")
            if time.monotonic() - last_sync >= 1.0:
                self._sync()
                last_sync = time.monotonic()

    def _sync(self) -> None:
        self.tokens.sync()
        self.controls.flush()
        os.fsync(self.controls.fileno())
        wav_file = self.wav._file  # the wave module's underlying file object
        wav_file.flush()
        os.fsync(wav_file.fileno())

    def close(self, totals: dict | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._thread.join()
        self.tokens.close()
        self.wav.close()
        self.controls.close()
        self.info.update(totals or {}, complete=True, frames=self.tokens.frames,
                         ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        (self.directory / "session.json").write_text(json.dumps(self.info, indent=2) + "\n")


def load_session(directory: Path) -> tuple[dict, list[dict], np.ndarray]:
    """(session.json, control entries, tokens [K, frames]) of a recorded session."""
    directory = Path(directory)
    try:
        info = json.loads((directory / "session.json").read_text())
        tokens = np.load(directory / "tokens.npy")
        entries = _read_jsonl(directory / "controls.jsonl")
    except FileNotFoundError as exc:
        raise RecordingError(f"{directory} is not a session recording: {Path(exc.filename).name} is missing") from exc
    except (OSError, ValueError) as exc:
        raise RecordingError(f"cannot read the session in {directory}: {exc}") from exc
    return info, entries, tokens


def _read_jsonl(path: Path) -> list[dict]:
    """Entries of a control log; a torn last line (the session was killed mid-write) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path.name} line {i + 1} is not JSON") from None
    return entries
