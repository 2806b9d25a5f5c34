"""Each command imports what it needs: `render`, `bench latency` and `bench codec` run with
only the core packages, and a command whose optional package is missing says so in one
line and exits 2.

The commands run in a subprocess where the optional packages are not installed, as far as
Python can tell: a `sitecustomize` on PYTHONPATH puts a path finder in front of the
standard one that finds none of them (so `importlib.util.find_spec` answers None and an
import raises ModuleNotFoundError, as on a machine without them). tqdm and pyyaml stay:
transformers and huggingface_hub require both, so no machine that runs musicsteer lacks them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from musicsteer.cli import main

REPO = Path(__file__).resolve().parents[1]
NOT_INSTALLED = ("mido", "rtmidi", "soundfile", "pythonosc", "xrfm", "rtmixer", "_rtmixer", "pa_ringbuffer",
                 "sounddevice", "_sounddevice_data", "matplotlib", "scipy", "aiohttp")

SITECUSTOMIZE = f'''
import importlib.machinery
import sys

NOT_INSTALLED = {set(NOT_INSTALLED)!r}


class WithoutOptional(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in NOT_INSTALLED:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [WithoutOptional if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture(scope="module")
def core_only(tmp_path_factory):
    """An environment for subprocesses in which only the core packages are installed."""
    site = tmp_path_factory.mktemp("core-only")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH")))))
    return env


def run(env, *args, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "musicsteer", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_optional_packages_are_hidden(core_only):
    proc = run(core_only, code="import importlib.util as u; import numpy, torch; "
                               "print([m for m in %r if u.find_spec(m) is not None])" % (NOT_INSTALLED,))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert run(core_only, code="import mido").returncode == 1


def test_building_the_parser_imports_no_model_code(core_only):
    proc = run(core_only, code="import sys; from musicsteer.cli import build_parser; build_parser(); "
                               "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_render_with_core_packages_only(core_only, tmp_path):
    out = tmp_path / "x.wav"
    proc = run(core_only, "render", "--model", "tiny", "--prompt", "x", "--duration", "0.2", "--out", str(out),
               "--compute", "cpu")
    assert proc.returncode == 0, proc.stderr
    with wave.open(str(out)) as wav:  # the same kind of file as before: 16-bit PCM, mono, 32 kHz
        assert (wav.getsampwidth(), wav.getnchannels(), wav.getframerate(), wav.getnframes()) == \
            (2, 1, 32000, 10 * 640)


@pytest.mark.slow
def test_bench_latency_with_core_packages_only(core_only, tmp_path):
    record = tmp_path / "latency.json"
    proc = run(core_only, "bench", "latency", "--model", "tiny", "--compute", "cpu", "--steps", "3", "--warmup", "1",
               "--concepts", "0", "--no-floor", "--json", str(record))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(record.read_text())["model"] == "tiny"


@pytest.mark.slow
def test_bench_codec_with_core_packages_only(core_only, tmp_path):
    record = tmp_path / "codec.json"
    proc = run(core_only, "bench", "codec", "--model", "tiny", "--compute", "cpu", "--frames", "100",
               "--json", str(record))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(record.read_text())["benchmark"] == "codec"


@pytest.mark.parametrize("args, packages", [
    (["probes", "dataset", "--out", "{tmp}/ds"], "mido, soundfile"),
    (["live", "--model", "tiny", "--prompt", "x", "--null", "fast", "--seconds", "0.2"],
     "pa-ringbuffer, rtmixer, python-osc"),
    (["live", "--model", "tiny", "--prompt", "x", "--out", "{tmp}/x.wav", "--no-osc", "--seconds", "0.2"],
     "pa-ringbuffer, rtmixer"),
    (["live", "--model", "tiny", "--prompt", "x", "--null", "--no-osc", "--web", "--seconds", "0.2"],
     "pa-ringbuffer, rtmixer, aiohttp"),
    (["midi", "ports"], "mido, python-rtmidi"),
    (["bench", "stream", "--model", "tiny", "--seconds", "1"], "pa-ringbuffer, rtmixer"),
    (["bench", "latency", "--model", "tiny", "--plot", "{tmp}/p.png"], "matplotlib"),
])
def test_a_missing_package_is_one_line_and_exit_2(core_only, tmp_path, args, packages):
    proc = run(core_only, *(a.format(tmp=tmp_path) for a in args))
    command = " ".join(args[:2]) if args[0] in ("probes", "midi", "bench") else args[0]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"musicsteer: error: {command} needs {'a package that is' if ',' not in packages else 'packages that are'} "
        f"not installed: {packages} (pip install {packages.replace(',', '')})"]


def test_an_import_no_check_named_is_one_line_too(monkeypatch, capsys, tmp_path):
    from musicsteer.cli import concepts

    def needs_scipy(args):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(concepts, "run_show", needs_scipy)
    assert main(["concepts", "show", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "musicsteer: error: concepts show needs a package that is not installed: scipy (pip install scipy)"]


def test_an_unknown_import_error_is_not_hidden(monkeypatch, tmp_path):
    from musicsteer.cli import concepts

    def broken(args):
        raise ModuleNotFoundError("No module named 'musicsteer.nothing'", name="musicsteer.nothing")

    monkeypatch.setattr(concepts, "run_show", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["concepts", "show", str(tmp_path)])
