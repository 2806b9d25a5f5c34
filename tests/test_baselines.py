"""The peers `bench latency --baseline transformers` times: transformers' MusicGen at the shape and
the precision of the run (float32, bfloat16, torch's dynamic int8)."""

import math

import pytest
import torch

from musicsteer.api import load_model
from musicsteer.bench.baselines import peer_precision, transformers_peer, transformers_step_ms


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_each_weight_format_is_compared_with_its_own_peer():
    assert peer_precision("full", "float32") == "float32"
    assert peer_precision("full", "bfloat16") == "bfloat16"
    assert peer_precision("bf16", "float32") == "bfloat16"
    assert peer_precision("int8", "float32") == "int8-dynamic"
    assert peer_precision("int4", "float32") == "int8-dynamic"  # torch has no CPU 4-bit path


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8-dynamic"])
def test_the_peer_has_the_shape_and_precision_it_claims(tiny, precision):
    hf = transformers_peer(tiny, precision)
    layers = hf.decoder.model.decoder.layers
    assert len(layers) == tiny.cfg.layers
    fc1 = layers[0].fc1
    if precision == "int8-dynamic":
        assert type(fc1).__name__ == "Linear" and "quantized" in type(fc1).__module__
        assert fc1.weight().dtype == torch.qint8 and fc1.weight().shape == (tiny.cfg.ffn, tiny.cfg.hidden)
    else:
        assert fc1.weight.dtype == getattr(torch, precision) and fc1.weight.shape == (tiny.cfg.ffn, tiny.cfg.hidden)


def test_the_dynamic_int8_peer_generates_and_is_timed(tiny):
    ms = transformers_step_ms(tiny, "int8-dynamic", cfg=3.0, steps=9)
    assert math.isfinite(ms) and ms > 0
