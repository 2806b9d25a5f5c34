"""`musicsteer render` end to end, and the one-line errors of the command line."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from musicsteer.cli import main


def render(tmp_path, *extra, name="out"):
    out, tokens = tmp_path / f"{name}.wav", tmp_path / f"{name}.npy"
    rc = main(["render", "--model", "tiny", "--prompt", "warm lofi piano", "--duration", "1.0",
               "--out", str(out), "--save-tokens", str(tokens), "--no-progress", *extra])
    return rc, out, tokens


def test_render_writes_wav_and_tokens(tmp_path):
    rc, out, tokens = render(tmp_path, "--seed", "5")
    assert rc == 0
    audio, sr = sf.read(out)
    assert sr == 32000 and audio.shape == (50 * 640,)
    assert np.abs(audio).max() > 1e-3  # the codec produced sound, not silence
    codes = np.load(tokens)
    assert codes.shape == (4, 50) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 2048


def test_same_seed_same_tokens_other_seed_other_tokens(tmp_path):
    _, _, a = render(tmp_path, "--seed", "11", name="a")
    _, _, b = render(tmp_path, "--seed", "11", name="b")
    _, _, c = render(tmp_path, "--seed", "12", name="c")
    assert np.array_equal(np.load(a), np.load(b))
    assert not np.array_equal(np.load(a), np.load(c))


def test_sampling_options_change_the_tokens(tmp_path):
    _, _, a = render(tmp_path, "--seed", "1", name="a")
    _, _, b = render(tmp_path, "--seed", "1", "--top-k", "2", "--temperature", "0.7", "--top-p", "0.9", name="b")
    _, _, g = render(tmp_path, "--greedy", "--cfg", "1.0", name="g")
    assert not np.array_equal(np.load(a), np.load(b))
    assert np.load(g).shape == (4, 50)


@pytest.mark.parametrize("args, message", [
    (["--model", "huge"], "unknown model 'huge'"),
    (["--model", "/no/such/model"], "no such directory"),
    (["--duration", "600"], r"--duration 600 s needs 30000 frames; this model holds 2044 \(40.88 s\)"),
    (["--duration", "-1"], "--duration must be a positive number"),
    (["--cfg", "-2"], "cfg must be >= 0"),
    (["--top-p", "3"], "top-p must be in"),
    (["--out", "/no/such/dir/x.wav"], "directory /no/such/dir does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    base = {"--model": "tiny", "--prompt": "x", "--duration": "0.2", "--out": "/tmp/musicsteer-test.wav"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["render", "--no-progress"] + [t for kv in base.items() for t in kv]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("musicsteer: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


def test_console_entry_point_prints_no_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "render", "--model", str(empty), "--prompt", "x",
                           "--duration", "1", "--out", str(tmp_path / "x.wav")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"musicsteer: error: {empty} holds neither a transformers MusicGen (config.json + model.safetensors) "
        "nor an audiocraft checkpoint (state_dict.bin + compression_state_dict.bin)"]
