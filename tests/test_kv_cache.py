"""The static self-attention caches (model/kv_cache.py): the 8-bit form's quantization, what its
update returns, and a decoder that keeps its keys and values in it."""

import pytest
import torch

from musicsteer.model.config import PRESETS
from musicsteer.model.kv_cache import KVCache, QuantizedKVCache, quantize_heads
from musicsteer.model.musicgen import MusicGen


def test_quantize_heads_is_symmetric_per_head_and_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 64, generator=g) * torch.logspace(-3, 2, 5)[:, None]  # scales far apart
    x[0, 0, 0] = 0
    q, scale = quantize_heads(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 5) and int(q.abs().max()) == 127
    assert scale[0, 0, 0] == 0 and not q[0, 0, 0].any()
    err = (q.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-6)).all()  # round to nearest, per head and position
    assert torch.equal(quantize_heads(-x)[0], -q)


def test_the_int8_cache_returns_its_filled_part_dequantized():
    c = QuantizedKVCache(2, 4, 16, 8, torch.float32, "cpu")
    assert c.k.dtype == torch.int8 and c.k_scale.shape == (2, 4, 16)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
    kd, vd = c.update(torch.arange(6), k, v, 6)
    assert kd.shape == (2, 4, 6, 8) and kd.dtype == torch.float32
    for got, want in ((kd, k), (vd, v)):
        step = want.abs().amax(-1, keepdim=True) / 127
        assert ((got - want).abs() <= step / 2 * (1 + 1e-6)).all()
    assert c.update(torch.tensor([6]), k[:, :, :1], v[:, :, :1])[0].shape == (2, 4, 16, 8)  # all of it
    plain = KVCache(2, 4, 16, 8, torch.float32, "cpu")
    assert plain.update(torch.arange(6), k, v, 6)[0].shape == (2, 4, 6, 8)


def test_a_decoder_with_an_int8_cache_follows_the_float32_one():
    cfg = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    text, mask = torch.randn(2, 5, cfg.text_hidden, generator=g), torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, cfg.vocab, (2, cfg.codebooks, 12), generator=g)
    outs = []
    for cache_dtype in (None, torch.int8):
        m = MusicGen.random(cfg, seed=3)
        m.cache_dtype = cache_dtype
        m.setup_caches(2, max_len=16, max_text=5)
        assert (m.caches[0].k.dtype == torch.int8) == (cache_dtype is not None)
        m.set_condition(text, mask)
        with torch.inference_mode():
            first = m.prefill(codes[..., :8])[:, -1]
            steps = [m.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(8, 12)]
        outs.append(torch.stack([first, *steps]))
    err = (outs[1] - outs[0]).abs().max() / outs[0].abs().max()
    assert 0 < err < 0.02  # the prompt and every step read the 8-bit cache


def test_load_model_takes_the_kv_cache_option():
    from musicsteer.model.loading.load import ModelLoadError, load_model

    m = load_model("tiny", kv_cache="int8")
    assert m.decoder.cache_dtype == torch.int8 and "int8 KV cache" in m.backend.detail
    m.decoder.setup_caches(2, max_len=8)
    assert isinstance(m.decoder.caches[0], QuantizedKVCache)
    assert load_model("tiny", weights="int8", kv_cache="float32").decoder.cache_dtype is None
    with pytest.raises(ModelLoadError, match="unknown KV cache format"):
        load_model("tiny", kv_cache="int3")
