"""Streaming EnCodec decode, stateful and windowed, against the offline decode of the same codes."""

import numpy as np
import pytest
import torch

from musicsteer.codec.codec import Codec
from musicsteer.codec.state import NotStreamable, StatefulDecoder
from musicsteer.codec.stream import (
    StreamingCodecSettings,
    StreamingDecoder,
    WindowedDecoder,
)


def stream_all(codec, codes, settings):
    dec = StreamingDecoder(codec, codes.shape[0], settings)
    parts = [a for f in range(codes.shape[1]) if (a := dec.push(codes[:, f])) is not None]
    parts.append(dec.flush())
    return np.concatenate(parts)


def rel_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def random_codes(frames, seed):
    return torch.randint(0, 2048, (4, frames), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_windowed_streaming_equals_offline(tiny, chunk):
    codes = random_codes(97, chunk)
    offline = tiny.codec.decode(codes)
    streamed = stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=chunk, method="window"))
    assert streamed.shape == offline.shape == (97 * 640,)
    assert rel_error(streamed, offline) < 1e-4


@pytest.mark.parametrize("frames", [1, 2, 3, 5, 9, 97])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stateful_streaming_equals_offline(tiny, frames, chunk):
    """From a one-frame clip (every layer pads both ends of it) to a long one, in any chunking."""
    codes = random_codes(frames, 10 * frames + chunk)
    offline = tiny.codec.decode(codes)
    streamed = stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=chunk))
    assert streamed.shape == offline.shape == (frames * 640,)
    assert rel_error(streamed, offline) < 1e-5


@pytest.mark.parametrize("causal,pad_mode", [(True, "reflect"), (False, "constant"), (True, "replicate")])
def test_stateful_follows_the_layout_of_other_codecs(causal, pad_mode):
    """Causal convolutions (padding all on the left, transposed outputs trimmed on the right) and
    other padding modes stream as exactly as MusicGen's codec."""
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config

    config = encodec_32khz_config(EncodecConfig, tiny=True)
    config.use_causal_conv, config.pad_mode = causal, pad_mode
    torch.manual_seed(0)
    codec = Codec(EncodecModel(config).eval(), "variant codec")
    dec = StatefulDecoder(codec, 4)
    if causal:
        assert dec.lookahead_samples == 0
    codes = random_codes(31, 7)
    offline = codec.decode(codes)
    for chunk in (1, 3):
        streamed = stream_all(codec, codes, StreamingCodecSettings(chunk=chunk))
        assert streamed.shape == offline.shape and rel_error(streamed, offline) < 1e-5


def test_stateful_is_the_default_and_windowed_the_fallback(tiny):
    assert isinstance(StreamingDecoder(tiny.codec, 4), StatefulDecoder)
    assert isinstance(StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(method="window")), WindowedDecoder)
    with pytest.raises(ValueError, match="codec method"):
        StreamingCodecSettings(method="fast")


def test_a_codec_with_group_norm_over_time_falls_back_to_the_window():
    """Group norm over time reads the whole clip: no stateful form, so the windowed decoder runs it."""
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config

    config = encodec_32khz_config(EncodecConfig, tiny=True)
    config.norm_type = "time_group_norm"
    codec = Codec(EncodecModel(config).eval(), "group-norm codec")
    with pytest.raises(NotStreamable):
        StatefulDecoder(codec, 4)
    config.norm_type, config.pad_mode = "weight_norm", "circular"  # wraps the clip's end into its start
    with pytest.raises(NotStreamable, match="circular"):
        StatefulDecoder(Codec(EncodecModel(config).eval(), "circular codec"), 4)
    dec = StreamingDecoder(codec, 4)
    assert isinstance(dec, WindowedDecoder)
    codes = random_codes(40, 3)
    assert stream_all(codec, codes, StreamingCodecSettings()).shape == (40 * 640,)


def test_stateful_emits_each_frame_once_it_is_final(tiny):
    """After n frames, every whole frame not within the codec's look-ahead (2402 samples) of the end is out."""
    dec = StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(chunk=1))
    assert dec.lookahead_samples == 2402  # 3 frames at 50 Hz, then the right paddings of every upsampling stage
    assert dec.latency_frames == 4
    for n in range(1, 30):
        dec.push(torch.zeros(4, dtype=torch.long))
        assert dec.emitted_samples == max(n * 640 - 2402, 0) // 640 * 640, n
    assert dec.emitted_samples == 25 * 640
    assert len(dec.flush()) == 4 * 640


def test_stateful_flush_ends_a_stream_and_the_next_starts_clean(tiny):
    dec = StatefulDecoder(tiny.codec, 4)
    assert len(dec.flush()) == 0  # nothing pushed: nothing to decode
    for seed in (1, 2):  # two clips through one decoder, no reset in between
        codes = random_codes(12, seed)
        parts = [a for f in range(12) if (a := dec.push(codes[:, f])) is not None]
        streamed = np.concatenate(parts + [dec.flush()])
        assert rel_error(streamed, tiny.codec.decode(codes)) < 1e-5


def test_stateful_state_stays_bounded(tiny):
    """What the layers keep does not grow with the stream: the cost of a frame is flat."""
    dec = StatefulDecoder(tiny.codec, 4, chunk=2)

    def held(chain):
        total = 0
        for s in chain.stages:
            for name in ("buf", "tail", "held"):
                t = getattr(s, name, None)
                total += 0 if t is None else t.numel()
            if hasattr(s, "block"):
                total += held(s.block)
        return total

    sizes = []
    for f in range(600):
        dec.push(torch.zeros(4, dtype=torch.long))
        sizes.append(held(dec.chain))
    assert max(sizes[50:]) == min(sizes[50:]) > 0


def test_stateful_without_the_c_kernels_equals_offline(tiny, monkeypatch):
    """Where the packed kernels do not build, the LSTM and transposed convolutions use torch's products."""
    from musicsteer.kernels import cpu as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "test: no compiler")
    codes = random_codes(23, 5)
    assert rel_error(stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=1)), tiny.codec.decode(codes)) < 1e-5


def test_windowed_without_lookahead_the_error_is_large(tiny):
    """The codec is not causal: zero look-ahead must not pass the tolerance above."""
    codes = random_codes(60, 0)
    offline = tiny.codec.decode(codes)
    streamed = stream_all(tiny.codec, codes, StreamingCodecSettings(lookahead=0, chunk=1, method="window"))
    assert rel_error(streamed, offline) > 1e-3


def test_windowed_emission_schedule(tiny):
    dec = StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(lookahead=4, chunk=2, method="window"))
    out = [dec.push(torch.zeros(4, dtype=torch.long)) for _ in range(10)]
    emitted = [i for i, a in enumerate(out) if a is not None]
    assert emitted == [5, 7, 9]  # frames 0-1 once frame 5 exists, then every 2 frames
    assert all(len(out[i]) == 2 * 640 for i in emitted)
    assert dec.latency_frames == 5
    assert dec.emitted_samples == 6 * 640
    assert len(dec.flush()) == 4 * 640


def test_windowed_work_per_frame_is_flat(tiny):
    """Every decode from the 10th to the 1000th frame sees the same number of frames, so the
    cost per frame cannot grow with the stream (`musicsteer bench codec` times it)."""
    dec = StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(chunk=2, method="window"))
    sizes = []
    original = tiny.codec.decode
    tiny.codec.decode = lambda codes: (sizes.append(codes.shape[1]), original(codes))[1]
    try:
        for _ in range(1010):
            dec.push(torch.zeros(4, dtype=torch.long))
    finally:
        tiny.codec.decode = original
    steady = sizes[15:]  # after the first windows fill their left context
    assert len(sizes) == (1010 - 4) // 2 and set(steady) == {dec.window} and dec.window == 31


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the codec on a GPU needs a CUDA device")
def test_stateful_on_cuda_equals_offline_on_cuda():
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config

    torch.manual_seed(0)
    codec = Codec(EncodecModel(encodec_32khz_config(EncodecConfig, tiny=True)).eval().cuda(), "tiny codec on cuda")
    codes = random_codes(40, 11)
    offline = codec.decode(codes)
    streamed = stream_all(codec, codes, StreamingCodecSettings(chunk=1))
    assert streamed.shape == offline.shape and rel_error(streamed, offline) < 1e-4


def snr_db(ref, approx):
    ref, approx = np.asarray(ref, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    return 10 * np.log10((ref ** 2).sum() / ((approx - ref) ** 2).sum())


def lstm_branch(codec, codes, precision, chunk):
    """The codec's LSTM branch (its output less the skip) over the codes' embeddings, offline and
    through the streaming stage in `chunk`-timestep calls."""
    from musicsteer.codec.state import _LSTM

    layers = codec.model.decoder.layers
    module = next(m for m in layers if type(m).__name__ == "EncodecLSTM")
    with torch.inference_mode():
        x = layers[0](codec.model.quantizer.decode(codes[:, None]))  # (1, C, T)
        stage = _LSTM(module, precision)
        streamed = torch.cat([stage.push(x[..., t : t + chunk]) for t in range(0, x.shape[-1], chunk)], dim=-1)
        return (module(x) - x)[0].numpy(), (streamed - x)[0].numpy()


@pytest.mark.parametrize("chunk", [1, 3])
def test_lstm_batches_the_input_product_over_the_chunk_exactly(tiny, chunk):
    """float32: the input product for all of a call's timesteps at once, then the recurrent one per
    timestep, equals torch's LSTM over the whole clip to round-off."""
    offline, streamed = lstm_branch(tiny.codec, random_codes(40, 2), "float32", chunk)
    assert rel_error(streamed, offline) < 1e-5


@pytest.mark.parametrize("no_kernels", [False, True])
def test_int8_lstm_is_close_to_float32(tiny, monkeypatch, no_kernels):
    """int8 (weights per output channel; activations per group of 64 in the packed kernel, bfloat16 in
    torch's fallback): the LSTM branch within 35 dB SNR of float32, the audio within 60 dB and 1e-3 of
    the offline float32 decode. (On MusicGen's shape, random weights: 42 dB for the LSTM branch; the
    skip around it hides most of that in the audio.)"""
    from musicsteer.kernels import cpu as cpu_kernels

    if no_kernels:
        monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "test: no compiler")
    offline, streamed = lstm_branch(tiny.codec, random_codes(40, 2), "int8", 2)
    assert 35 < snr_db(offline, streamed) < 100  # approximate: not the float32 path by mistake
    codes = random_codes(37, 4)
    reference = tiny.codec.decode(codes)
    audio = stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=2, precision="int8"))
    assert audio.shape == reference.shape
    assert snr_db(reference, audio) > 60 and rel_error(audio, reference) < 1e-3


def test_int8_transposed_convolutions_are_close_to_float32(tiny, monkeypatch):
    """int8 also reads the weight-bound transposed convolutions' weights as int8 (over LARGE_WEIGHT
    entries; the tiny codec has none that large, so the threshold is lowered here)."""
    from musicsteer.codec import state

    monkeypatch.setattr(state, "LARGE_WEIGHT", 0)
    dec = StatefulDecoder(tiny.codec, 4, chunk=3, precision="int8")
    reduced = [s.reduced for s in dec.chain.stages if isinstance(s, state._ConvTranspose)]
    assert reduced == [True, False, False, False]  # 64 inputs; the narrower ones do not fit the int8 layout
    codes = random_codes(37, 6)
    reference = tiny.codec.decode(codes)
    audio = stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=3, precision="int8"))
    assert 35 < snr_db(reference, audio) < 100 and rel_error(audio, reference) < 1e-2


@pytest.fixture(scope="module")
def musicgen_codec():
    """A random EnCodec at MusicGen-small's own shape (1024-wide LSTM of two layers, 64 filters)."""
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config, randomize_codebooks

    torch.manual_seed(0)
    return Codec(randomize_codebooks(EncodecModel(encodec_32khz_config(EncodecConfig)).eval()), "small-shape codec")


def test_at_musicgen_shape_float32_equals_and_int8_is_close(musicgen_codec):
    """The shape the bench times, where the packed and im2col products take over from oneDNN:
    float32 equal to round-off in any chunking; int8 (LSTM and the first two transposed
    convolutions) at over 55 dB SNR (68.7 dB measured) against the offline float32 decode."""
    codes = random_codes(24, 8)
    with torch.inference_mode():
        reference = musicgen_codec.decode(codes)
        for chunk in (1, 4):
            audio = stream_all(musicgen_codec, codes, StreamingCodecSettings(chunk=chunk))
            assert audio.shape == reference.shape and rel_error(audio, reference) < 1e-5
        audio = stream_all(musicgen_codec, codes, StreamingCodecSettings(chunk=2, precision="int8"))
    assert 55 < snr_db(reference, audio) < 100 and rel_error(audio, reference) < 1e-2


def test_codec_precision_is_checked(tiny):
    with pytest.raises(ValueError, match="codec precision"):
        StreamingCodecSettings(precision="int4")
    with pytest.raises(ValueError, match="codec precision"):
        StatefulDecoder(tiny.codec, 4, precision="bf8")
    assert StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(precision="int8")).precision == "int8"
    with pytest.raises(ValueError, match="windowed"):
        StreamingCodecSettings(method="window", precision="int8")


def test_int8_on_a_codec_that_cannot_stream_says_it_runs_float32(caplog):
    from transformers import EncodecConfig, EncodecModel

    from musicsteer.model.loading.load import encodec_32khz_config

    config = encodec_32khz_config(EncodecConfig, tiny=True)
    config.norm_type = "time_group_norm"
    codec = Codec(EncodecModel(config).eval(), "group-norm codec")
    with caplog.at_level("WARNING", logger="musicsteer.codec.stream"):
        assert isinstance(StreamingDecoder(codec, 4, StreamingCodecSettings(precision="int8")), WindowedDecoder)
    assert "not applied" in caplog.text


def test_bench_codec_reports_cost_and_fidelity(tiny):
    from musicsteer.bench.codec import run_codec_bench

    record = run_codec_bench(tiny, frames=100, chunk=2, precision="int8")
    assert record["precision"] == "int8" and record["chunk"] == 2 and record["latency_frames"] == 5
    assert record["ms_per_frame_mean"] > 0 and record["ms_per_call_p50"] > 0
    assert record["snr_db_vs_offline_float32"] > 60
    assert "snr_db_vs_offline_float32" not in run_codec_bench(tiny, frames=100, chunk=1)
