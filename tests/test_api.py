"""The public Python API (musicsteer/api.py, exported lazily from musicsteer): renders that
match the CLI token for token, a live handle that plays, takes settings and stops, and
bad arguments as clear errors."""

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import musicsteer as ms
from musicsteer.cli import main

PROMPT = "warm lofi piano"


def test_import_is_light_and_names_resolve():
    code = ("import sys, musicsteer; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert set(musicsteer.__all__) <= set(dir(musicsteer)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in ms.__all__:
        assert getattr(ms, name) is not None
        # a submodule of that name would replace the export on the package once imported
        assert name == "__version__" or importlib.util.find_spec(f"musicsteer.{name}") is None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ms.nope


@pytest.fixture(scope="module")
def model():
    return ms.load_model("tiny")


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack")
    assert main(["concepts", "make", "--model", "tiny", "--out", str(out), "--random", "cmaj", "fast"]) == 0
    return out


def _cli_tokens(tmp_path, *extra):
    wav, npy = tmp_path / "cli.wav", tmp_path / "cli.npy"
    assert main(["render", "--model", "tiny", "--prompt", PROMPT, "--duration", "1.0", "--out", str(wav),
                 "--save-tokens", str(npy), "--no-progress", *extra]) == 0
    return np.load(npy), sf.read(wav, dtype="float32")[0]


def test_render_matches_the_cli_token_for_token(model, tmp_path):
    cli, cli_audio = _cli_tokens(tmp_path, "--seed", "7", "--cfg", "2.5", "--top-k", "50")
    clip = ms.render_clip(model, PROMPT, 1.0, seed=7, cfg=2.5, top_k=50, out=tmp_path / "api.wav")
    assert clip.codes.dtype == np.int64 and clip.codes.shape == (4, 50)
    np.testing.assert_array_equal(clip.codes, cli)
    assert clip.sample_rate == model.codec.sample_rate and clip.seconds == 1.0
    assert clip.audio.dtype == np.float32 and clip.audio.shape == cli_audio.shape
    written = sf.read(tmp_path / "api.wav", dtype="float32")[0]
    np.testing.assert_array_equal(written, cli_audio)  # the same 16-bit file
    other = ms.render_clip(model, PROMPT, 1.0, seed=8, cfg=2.5, top_k=50)
    assert (other.codes != clip.codes).any()


def test_steered_render_matches_the_cli_and_takes_a_pack_object(model, pack_dir, tmp_path):
    cli, _ = _cli_tokens(tmp_path, "--seed", "3", "--concepts", str(pack_dir), "--steer", "cmaj=3.0",
                         "--schedule", "fast=linear-up:0.5s", "--steer-mode", "norm")
    args = dict(seed=3, steer={"cmaj": 3.0}, schedules={"fast": "linear-up:0.5s"}, steering={"mode": "norm"})
    from_dir = ms.render_clip(model, PROMPT, 1.0, concepts=pack_dir, **args)
    np.testing.assert_array_equal(from_dir.codes, cli)
    from_object = ms.render_clip(model, PROMPT, 1.0, concepts=ms.ConceptPack.load(pack_dir), **args)
    np.testing.assert_array_equal(from_object.codes, cli)
    plain = ms.render_clip(model, PROMPT, 1.0, seed=3)
    assert (plain.codes != cli).any()  # the steering did something


def test_make_pack_gives_the_cli_pack(model, pack_dir):
    made = ms.make_pack(model, random=["cmaj", "fast"])
    loaded = ms.ConceptPack.load(pack_dir)
    assert made.names == loaded.names
    for name in made.names:
        assert np.array_equal(made[name].directions.numpy(), loaded[name].directions.numpy())
    vec = np.ones(model.cfg.hidden, np.float32)
    both = ms.make_pack("tiny", random=["a"], vectors={"b": vec})
    assert both.names == ["a", "b"] and both.meta["method"] == "random+user"


def test_live_handle_plays_takes_settings_and_stops(model, pack_dir, tmp_path):
    with ms.start_live(model, PROMPT, concepts=pack_dir, null="fast", record=tmp_path / "s") as live:
        assert live.running and live.concepts == ["cmaj", "fast"]
        assert live.get("cfg") == 3.0 and live.get("concept/cmaj/strength") == 0.0
        live.set("concept/cmaj/strength", 0.5)
        live.set("/musicsteer/cfg", 4.0)  # an OSC address works too
        live.set("temperature", 0.9, smooth_ms=40)
        live.prompt("ambient pads")
        assert live.get("cfg") == 4.0 and live.get("prompt") == "ambient pads"
        start = live.stats().steps
        while live.stats().steps < start + 20 or live.stats().prompts_pending:  # the prompt is built off-thread
            assert live.running, live.stats().error
            time.sleep(0.005)
        built = live.stats().steps
        while live.stats().steps < built + 2:  # and swapped in at the start of a step
            time.sleep(0.005)
        stats = live.stats()
        assert stats.running and stats.frames > 0 and stats.error is None
    result = live.stop()  # idempotent after the context manager stopped it
    assert not live.running and result.frames_played > 0 and result.stats.error is None
    with pytest.raises(ms.MusicsteerError, match="stopped"):
        live.set("cfg", 2.0)
    logged = [json.loads(line) for line in (tmp_path / "s" / "controls.jsonl").read_text().splitlines()]
    changes = {e["param"]: e for e in logged}
    assert changes["concept/cmaj/strength"]["value"] == 0.5 and changes["cfg"]["value"] == 4.0
    assert changes["prompt"]["value"] == "ambient pads" and changes["temperature"]["smooth_ms"] == 40
    assert {e["source"] for e in logged} == {"api"}


def test_live_session_with_a_time_limit_plays_it_all(model):
    with ms.start_live(model, PROMPT, null="fast", seconds=1.0, concepts=ms.make_pack(model, random=["x"]),
                       steer={"x": 1.0}) as live:
        assert live.wait(timeout=60)
    result = live.stop()
    assert result.stats.frames == 50 and result.frames_played == 50 * model.codec.hop


@pytest.mark.parametrize("call, message", [
    (lambda m: ms.render_clip(m, PROMPT, 0), "seconds must be a positive number"),
    (lambda m: ms.render_clip(m, "", 1.0), "prompt must be a non-empty string"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, cfg=-1), "cfg must be >= 0"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, steer={"cmaj": 1.0}), "need a concept pack"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, steering={"mode": "loud"}), "steering mode 'loud'"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, out="/no/such/dir/x.wav"), "does not exist"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, concepts=ms.make_pack(m, random=["a"]), steer={"b": 1.0}),
     "no concept 'b'"),
    (lambda m: ms.render_clip(m, PROMPT, 1.0, concepts=ms.make_pack(m, random=["a"]), steer={"a": "lots"}),
     "a strength is a finite number"),
    (lambda m: ms.start_live(m, PROMPT, null="slow"), "null='slow'"),
    (lambda m: ms.start_live(m, PROMPT, null="fast", out="x.wav"), "one of out, null and device"),
    (lambda m: ms.start_live(m, PROMPT, null="fast", seconds=-1), "seconds must be a positive number"),
    (lambda m: ms.load_model("no-such-model"), "unknown model 'no-such-model'"),
    (lambda m: ms.load_model("tiny", dtype="float8"), "dtype 'float8'"),
    (lambda m: ms.make_pack(m), "make_pack needs"),
])
def test_bad_arguments_are_clear_errors(model, call, message):
    with pytest.raises(ms.MusicsteerError, match=message):
        call(model)


def test_bad_live_settings_are_clear_errors_and_the_session_goes_on(model):
    with ms.start_live(model, PROMPT, null="fast", concepts=ms.make_pack(model, random=["a"])) as live:
        for param, value, message in [("concept/b/strength", 1.0, "unknown concept 'b'"),
                                      ("cfg", "high", "cfg needs a number"),
                                      ("volume", 1.0, "unknown parameter 'volume'"),
                                      ("prompt", "", "non-empty string"),
                                      ("concept/a/schedule", "wobble", "unknown schedule .wobble.")]:
            with pytest.raises(ms.MusicsteerError, match=message):
                live.set(param, value)
        live.set("cfg", 99.0)  # out of range: clamped, as over OSC
        assert live.get("cfg") == 20.0
        assert live.running
