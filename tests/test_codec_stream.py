"""Streaming EnCodec decode against the offline decode of the same codes."""

import numpy as np
import pytest
import torch

from musicsteer.engine.codec_stream import StreamingCodecSettings, StreamingDecoder


def stream_all(codec, codes, settings):
    dec = StreamingDecoder(codec, codes.shape[0], settings)
    parts = [a for f in range(codes.shape[1]) if (a := dec.push(codes[:, f])) is not None]
    parts.append(dec.flush())
    return np.concatenate(parts)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_equals_offline(tiny, chunk):
    codes = torch.randint(0, 2048, (4, 97), generator=torch.Generator().manual_seed(chunk))
    offline = tiny.codec.decode(codes)
    streamed = stream_all(tiny.codec, codes, StreamingCodecSettings(chunk=chunk))
    assert streamed.shape == offline.shape == (97 * 640,)
    rel = np.abs(streamed - offline).max() / np.abs(offline).max()
    assert rel < 1e-4, rel


def test_without_lookahead_the_error_is_large(tiny):
    """The codec is not causal: zero look-ahead must not pass the tolerance above."""
    codes = torch.randint(0, 2048, (4, 60), generator=torch.Generator().manual_seed(0))
    offline = tiny.codec.decode(codes)
    streamed = stream_all(tiny.codec, codes, StreamingCodecSettings(lookahead=0, chunk=1))
    assert np.abs(streamed - offline).max() / np.abs(offline).max() > 1e-3


def test_emission_schedule(tiny):
    dec = StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(lookahead=4, chunk=2))
    out = [dec.push(torch.zeros(4, dtype=torch.long)) for _ in range(10)]
    emitted = [i for i, a in enumerate(out) if a is not None]
    assert emitted == [5, 7, 9]  # frames 0-1 once frame 5 exists, then every 2 frames
    assert all(len(out[i]) == 2 * 640 for i in emitted)
    assert dec.latency_frames == 5
    assert len(dec.flush()) == 4 * 640


def test_work_per_frame_is_flat(tiny):
    """Every decode from the 10th to the 1000th frame sees the same number of frames, so the
    cost per frame cannot grow with the stream (`musicsteer bench codec` times it)."""
    dec = StreamingDecoder(tiny.codec, 4, StreamingCodecSettings(chunk=2))
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
