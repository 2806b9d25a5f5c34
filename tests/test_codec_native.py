"""The stateful codec decoder as a C plan (codec/native.py, kernels/cpu_codec.c) against the Python
stateful decoder it mirrors (codec/state.py) and the offline decode: float32 equal to round-off,
int8 much closer to the Python int8 path than either is to float32, across start-up, steady state
and the end of a clip, in every chunking; the portable and x86-64-v3 builds as well."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from musicsteer.codec.codec import Codec
from musicsteer.codec.native import NativeDecoder, NotNative
from musicsteer.codec.state import StatefulDecoder
from musicsteer.codec.stream import StreamingCodecSettings, StreamingDecoder
from musicsteer.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable() is not None,
                                reason=f"the CPU kernels do not build here: {cpu_kernels.unavailable()}")


def random_codes(frames, seed):
    return torch.randint(0, 2048, (4, frames), generator=torch.Generator().manual_seed(seed))


def run(dec, codes):
    """Every push's output (None or audio) and the flush's."""
    return [dec.push(codes[:, f]) for f in range(codes.shape[1])] + [dec.flush()]


def joined(outs):
    return np.concatenate([a for a in outs if a is not None])


def rel_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def snr_db(ref, approx):
    ref, approx = np.asarray(ref, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    return 10 * np.log10((ref ** 2).sum() / ((approx - ref) ** 2).sum())


def codec_of(tiny=True, **changes):
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config, randomize_codebooks

    config = encodec_32khz_config(EncodecConfig, tiny=tiny)
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = EncodecModel(config).eval()
    return Codec(model if tiny else randomize_codebooks(model), "test codec")


@pytest.fixture(scope="module")
def small_codec():
    """A random EnCodec at MusicGen-small's shape (1024-wide LSTM of two layers, 64 filters)."""
    return codec_of(tiny=False)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_float32_equals_the_python_decoder_push_by_push_and_the_offline_decode(tiny, chunk):
    """300 frames: the same pushes emit audio, of the same lengths, equal to round-off."""
    codes = random_codes(301, chunk)
    with torch.inference_mode():
        native, python = run(NativeDecoder(tiny.codec, 4, chunk), codes), run(StatefulDecoder(tiny.codec, 4, chunk), codes)
        offline = tiny.codec.decode(codes)
    assert [None if a is None else len(a) for a in native] == [None if a is None else len(a) for a in python]
    assert rel_error(joined(native), joined(python)) < 1e-5
    assert joined(native).shape == offline.shape and rel_error(joined(native), offline) < 1e-5


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 9])
def test_short_clips_pad_both_ends_as_offline(tiny, frames):
    """A clip shorter than the first convolution's left padding is padded as transformers pads it."""
    codes = random_codes(frames, frames)
    for chunk in (1, 2, 4):
        audio = joined(run(NativeDecoder(tiny.codec, 4, chunk), codes))
        offline = tiny.codec.decode(codes)
        assert audio.shape == offline.shape == (frames * 640,) and rel_error(audio, offline) < 1e-5, (frames, chunk)


def test_a_flush_ends_the_clip_and_the_next_starts_clean(tiny):
    dec = NativeDecoder(tiny.codec, 4, chunk=2)
    assert len(dec.flush()) == 0
    for seed, frames in ((1, 12), (2, 7), (3, 30)):  # no reset in between
        codes = random_codes(frames, seed)
        assert rel_error(joined(run(dec, codes)), tiny.codec.decode(codes)) < 1e-5
    assert dec.lookahead_samples == StatefulDecoder(tiny.codec, 4).lookahead_samples == 2402
    assert dec.latency_frames == 5


@pytest.mark.parametrize("causal,pad_mode", [(True, "reflect"), (False, "constant"), (True, "replicate"),
                                             (False, "replicate")])
def test_other_layouts_equal_offline(causal, pad_mode):
    codec = codec_of(use_causal_conv=causal, pad_mode=pad_mode)
    codes = random_codes(23, 7)
    offline = codec.decode(codes)
    for chunk in (1, 3):
        audio = joined(run(NativeDecoder(codec, 4, chunk), codes))
        assert audio.shape == offline.shape and rel_error(audio, offline) < 1e-5, chunk


def test_two_threads_compute_what_one_does(small_codec):
    """Work splits over output blocks: each output is one thread's, so the samples are equal bit for bit."""
    codes = random_codes(10, 4)
    with torch.inference_mode():
        one = joined(run(NativeDecoder(small_codec, 4, 2, "int8", threads=1), codes))
        two = joined(run(NativeDecoder(small_codec, 4, 2, "int8", threads=2), codes))
    assert np.array_equal(one, two)


@pytest.mark.skipif(not cpu_kernels.has_int8(), reason="this build has no int8 kernels")
def test_int8_is_the_python_int8_path_to_its_own_sensitivity(tiny, monkeypatch):
    """int8 quantizes each product's input per group of 64: round-off upstream moves an input across a
    rounding boundary now and then, so the paths are not equal bit for bit; they are much closer to
    each other than int8 is to float32 (the LSTM, and with LARGE_WEIGHT lowered the first transposed
    convolution)."""
    from musicsteer.codec import state

    monkeypatch.setattr(state, "LARGE_WEIGHT", 0)
    codes = random_codes(200, 6)
    offline = tiny.codec.decode(codes)
    for chunk in (1, 2, 4):
        with torch.inference_mode():
            native = joined(run(NativeDecoder(tiny.codec, 4, chunk, "int8"), codes))
            python = joined(run(StatefulDecoder(tiny.codec, 4, chunk, "int8"), codes))
        assert native.shape == offline.shape
        assert 35 < snr_db(offline, native) < 100 and rel_error(native, offline) < 1e-2  # not float32 by mistake
        assert snr_db(python, native) > snr_db(offline, python) + 20, chunk


@pytest.mark.skipif(not cpu_kernels.has_int8(), reason="this build has no int8 kernels")
def test_at_musicgen_shape(small_codec):
    """float32 equal to the Python decoder and the offline decode at chunks 1, 2, 4; int8 (LSTM and the
    first two transposed convolutions) at 87 dB from the Python int8 path, 69 dB from float32."""
    codes = random_codes(24, 8)
    with torch.inference_mode():
        offline = small_codec.decode(codes)
        for chunk in (1, 2, 4):
            audio = joined(run(NativeDecoder(small_codec, 4, chunk), codes))
            assert audio.shape == offline.shape and rel_error(audio, offline) < 1e-5, chunk
        python = joined(run(StatefulDecoder(small_codec, 4, 2), codes))
        assert rel_error(audio, python) < 1e-5
        native8 = joined(run(NativeDecoder(small_codec, 4, 2, "int8"), codes))
        python8 = joined(run(StatefulDecoder(small_codec, 4, 2, "int8"), codes))
    assert 55 < snr_db(offline, native8) < 100 and snr_db(python8, native8) > 75


def test_the_stream_takes_the_native_plan_where_it_builds(tiny, monkeypatch, caplog):
    assert type(StreamingDecoder(tiny.codec, 4)) is NativeDecoder
    assert type(StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(native=False))) is StatefulDecoder
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "test: no compiler")
    with pytest.raises(NotNative, match="no compiler"):
        NativeDecoder(tiny.codec, 4)
    with caplog.at_level("INFO", logger="musicsteer.codec.stream"):
        assert type(StreamingDecoder(tiny.codec, 4)) is StatefulDecoder
    assert "Python stateful decoder" in caplog.text


def test_a_codec_the_stream_cannot_run_still_falls_back_to_the_window():
    from musicsteer.codec.stream import WindowedDecoder

    assert isinstance(StreamingDecoder(codec_of(norm_type="time_group_norm"), 4), WindowedDecoder)


def test_bad_input_is_refused_in_one_line(tiny):
    dec = NativeDecoder(tiny.codec, 4)
    with pytest.raises(RuntimeError, match="push of 1 frames: a shape or an argument"):
        dec.push(torch.tensor([0, 1, 2, 2048]))
    with pytest.raises(ValueError, match="codec chunk"):
        NativeDecoder(tiny.codec, 4, chunk=0)
    with pytest.raises(ValueError, match="codec precision"):
        NativeDecoder(tiny.codec, 4, precision="int4")


def test_stage_times_cover_every_stage(tiny):
    dec = NativeDecoder(tiny.codec, 4)
    for f in range(8):
        dec.push(torch.zeros(4, dtype=torch.long))
    times = dec.stage_seconds()
    kinds = [k for k, _ in times]
    assert kinds[:3] == ["conv", "lstm", "elu"] and kinds[-1] == "conv" and kinds.count("convt") == 4
    assert kinds.count("open") == kinds.count("close") == 4 and all(t >= 0 for _, t in times)
    assert sum(t for _, t in times) > 0 and sum(t for _, t in dec.stage_seconds()) == 0  # the clocks restart


BUILD_CHECK = r"""
import sys
import numpy as np
import torch
from musicsteer.kernels import cpu
from musicsteer.codec.native import NativeDecoder, NotNative
from musicsteer.codec.state import StatefulDecoder
from musicsteer.codec.stream import StreamingDecoder, StreamingCodecSettings
from musicsteer.model.config import PRESETS
from musicsteer.model.loading.load import load_model

expect = sys.argv[1]
assert cpu.paths()["codec"] == expect, cpu.paths()
codec = load_model("tiny").codec
codes = torch.randint(0, 2048, (4, 60), generator=torch.Generator().manual_seed(0))
def stream(dec):
    parts = [a for f in range(60) if (a := dec.push(codes[:, f])) is not None]
    return np.concatenate(parts + [dec.flush()])
offline = codec.decode(codes)
for chunk in (1, 3):
    audio = stream(NativeDecoder(codec, 4, chunk))
    assert audio.shape == offline.shape and np.abs(audio - offline).max() / np.abs(offline).max() < 1e-5, chunk
if cpu.has_int8():
    native, python = stream(NativeDecoder(codec, 4, 2, "int8")), stream(StatefulDecoder(codec, 4, 2, "int8"))
    err = lambda a, b: ((a - b).astype(np.float64) ** 2).sum() / (b.astype(np.float64) ** 2).sum()
    assert err(native, python) < err(python, offline) / 100
else:  # the portable build: float32 native, int8 the Python decoder
    try:
        NativeDecoder(codec, 4, 1, "int8")
        raise AssertionError("int8 without int8 kernels")
    except NotNative:
        pass
    assert type(StreamingDecoder(codec, 4, StreamingCodecSettings(precision="int8"))) is StatefulDecoder
print("codec build ok")
"""


@pytest.mark.parametrize("march,path", [("x86-64-v2", "portable"), ("x86-64-v3", "avx2")])
def test_the_portable_and_avx2_builds_decode_the_same(tmp_path, march, path):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the CPU kernels cannot be built")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if march == "x86-64-v3" and not (" avx2" in flags and " fma" in flags):
        pytest.skip("this CPU has no AVX2 and FMA: it cannot run the x86-64-v3 build")
    env = dict(os.environ, MUSICSTEER_CPU_MARCH=march, MUSICSTEER_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", BUILD_CHECK, path], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "codec build ok" in done.stdout


def test_bench_codec_splits_the_native_plan_by_stage(tiny):
    from musicsteer.bench.codec import run_codec_bench

    record = run_codec_bench(tiny, frames=100, chunk=2)
    assert record["method"] == "NativeDecoder"
    split = record["stage_ms_per_frame"]
    assert set(split) == {"conv", "lstm", "convt", "pointwise", "convt_each", "residual_each"}
    assert len(split["convt_each"]) == len(split["residual_each"]) == 4 and split["lstm"] > 0
    parts = split["conv"] + split["lstm"] + split["convt"] + split["pointwise"]
    assert 0 < parts < 2 * record["ms_per_frame_mean"]  # the plan's clocks run inside the timed pushes
    python = run_codec_bench(tiny, frames=100, chunk=2, native=False)
    assert python["method"] == "StatefulDecoder" and "stage_ms_per_frame" not in python
