"""What each layer of a SEANet decoder (EnCodec's) is when it streams: a convolution's padding at
the clip's ends, a transposed convolution's trim, and the checks that refuse a layer or a codec
the stateful decoders cannot run (NotStreamable). The Python stateful decoder (state.py) and its
C plan (native.py) both read them, so both pad, trim and refuse alike.

It knows nothing of threads, weights' precision or how a stage computes.
"""

from __future__ import annotations

import math

import torch

from .codec import Codec

PRECISIONS = ("float32", "int8")


class NotStreamable(ValueError):
    """The codec has a layer the stateful decoders cannot run (group norm over time,
    chunked decode): the windowed decoder handles it."""


def conv_padding(module) -> tuple[int, int]:
    """An EncodecConv1d's (left, right) padding as a stream runs it, or NotStreamable."""
    if module.norm_type != "weight_norm" or module.conv.stride[0] != 1:
        raise NotStreamable("only weight-normed convolutions of stride 1 stream")
    if module.pad_mode not in ("reflect", "replicate", "constant", "zero"):  # circular wraps to the clip's end
        raise NotStreamable(f"padding mode {module.pad_mode!r} reads the end of the clip")
    total = int(module.padding_total)
    right = 0 if module.causal else total // 2
    return total - right, right


def transposed_trim(module) -> tuple[int, int]:
    """An EncodecConvTranspose1d's (left, right) output samples trimmed at the clip's ends, or NotStreamable."""
    if module.norm_type != "weight_norm":
        raise NotStreamable("only weight-normed transposed convolutions stream")
    total = module.conv.kernel_size[0] - module.conv.stride[0]
    right = math.ceil(total * module.trim_right_ratio) if module.causal else total // 2
    return total - right, right


def check_lstm(lstm: torch.nn.LSTM) -> None:
    if lstm.bidirectional or lstm.proj_size or not lstm.bias or lstm.batch_first:
        raise NotStreamable("only plain unidirectional LSTMs stream")


def check_codec(codec: Codec, precision: str) -> None:
    """NotStreamable for a codec decoded in chunks; ValueError for an unknown precision."""
    if getattr(codec.model.config, "chunk_length", None) is not None:
        raise NotStreamable("the codec decodes in overlapping chunks")
    if precision not in PRECISIONS:
        raise ValueError(f"codec precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
