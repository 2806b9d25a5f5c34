"""int8 weights: close to the float32 products, and a whole decoder that still decodes."""

import pytest
import torch

from musicsteer.backends.cpu.int8 import Int8Linear, PackedInt8Linear, quantize_int8
from musicsteer.backends.cpu.linear import Linear
from musicsteer.errors import ModelLoadError
from musicsteer.model.loading.load import load_model


@pytest.mark.parametrize("rows", [1, 2, 37])
def test_int8_linear_is_close_to_float(rows):
    lin = Linear(256, 96, bias=False)
    q = Int8Linear(lin.weight)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (96, 256)
    x = torch.randn(rows, 1, 256)
    want = lin(x)
    got = q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()) < 0.02


def test_quantized_decoder_logits_follow_the_float_ones(tiny):
    q = load_model("tiny", weights="int8")
    assert not any(isinstance(m, Linear) for m in q.decoder.modules())
    # per block: qkv, out, cross q, cross kv, cross out, fc1, fc2; and the heads
    assert sum(isinstance(m, (Int8Linear, PackedInt8Linear)) for m in q.decoder.modules()) == 2 * 7 + 1
    codes = torch.randint(0, 2048, (2, 4, 30), generator=torch.Generator().manual_seed(0))
    for model in (tiny, q):
        model.decoder.setup_caches(2, max_len=30)
        states, mask = model.text.encode("x")
        model.decoder.set_condition(torch.cat([states, states]), torch.cat([mask, mask]))
    with torch.inference_mode():
        a = tiny.decoder(codes, torch.arange(30), use_cache=False)
        b = q.decoder(codes, torch.arange(30), use_cache=False)
    assert ((a - b).norm() / a.norm()) < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_unknown_weight_format():
    with pytest.raises(ModelLoadError, match="unknown weight format"):
        load_model("tiny", weights="int3")


def test_quantize_leaves_biased_layers_alone():
    m = torch.nn.Sequential(Linear(8, 8, bias=True), Linear(8, 8, bias=False))
    quantize_int8(m, packed=False)
    assert isinstance(m[0], Linear) and isinstance(m[1], Int8Linear)
