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


needs_kernels = pytest.mark.skipif(__import__("musicsteer.kernels.cpu", fromlist=["x"]).library() is None,
                                   reason="the CPU kernels do not build here (no C compiler)")


@needs_kernels
@pytest.mark.parametrize("B,H,L,hd,T,start", [(2, 4, 40, 64, 7, 5), (1, 3, 20, 48, 3, 0), (2, 16, 100, 64, 32, 60),
                                               (1, 2, 12, 100, 4, 3), (2, 3, 9, 12, 5, 1)])
def test_the_kernel_stores_and_dequantizes_as_the_int8_cache_does(B, H, L, hd, T, start):
    from musicsteer.kernels import cpu

    g = torch.Generator().manual_seed(B * 100 + T)
    ref, fast = (QuantizedKVCache(B, H, L, hd, torch.float32, "cpu") for _ in range(2))
    for call in range(2):  # the second call finds the first one's positions in the cache
        fused = torch.randn(B, T, 3, H, hd, generator=g) * 3  # keys and values strided, as in a layer
        _, k, v = fused.permute(2, 0, 3, 1, 4)
        pos = (torch.arange(T) + start + call * T) % L
        upto = int(pos.max()) + 1
        want = ref.update(pos, k, v, upto)
        got = cpu.kv_store_i8(k, pos, fast.k, fast.k_scale, upto), cpu.kv_store_i8(v, pos, fast.v, fast.v_scale, upto)
        for name in ("k", "v", "k_scale", "v_scale"):
            assert torch.equal(getattr(ref, name), getattr(fast, name)), name
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cpu.kv_store_i8(k, pos, fast.k, fast.k_scale, None) is None
    with pytest.raises(RuntimeError, match="refused"):
        cpu.kv_store_i8(k, pos + L, fast.k, fast.k_scale, upto)


@needs_kernels
def test_the_kernel_rounds_halves_to_even_and_keeps_zero_heads_as_the_int8_cache_does():
    """Values exactly between two steps (scale 1: a head whose largest value is 127) round to the
    even one, as torch.round does; an all-zero head has scale 0 and zero bytes."""
    from musicsteer.kernels import cpu

    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5])
    x = torch.zeros(1, 2, 1, 20)
    x[0, 0, 0, :8], x[0, 0, 0, 8] = halves, 127.0
    ref, fast = (QuantizedKVCache(1, 2, 4, 20, torch.float32, "cpu") for _ in range(2))
    pos = torch.tensor([2])
    ref.update(pos, x, x, 3)
    cpu.kv_store_i8(x, pos, fast.k, fast.k_scale, None)
    assert torch.equal(fast.k, ref.k) and torch.equal(fast.k_scale, ref.k_scale)
    assert fast.k[0, 0, 2, :9].tolist() == [0, 2, 2, 0, -2, -2, 126, -126, 127]
    assert fast.k_scale[0, 1, 2] == 0 and not fast.k[0, 1, 2].any()


@needs_kernels
def test_the_cpu_backends_prefill_into_an_int8_cache_equals_the_reference(monkeypatch):
    from musicsteer.backends.cpu import attention
    from musicsteer.kernels import cpu

    calls = []
    store = cpu.kv_store_i8
    monkeypatch.setattr(cpu, "kv_store_i8", lambda *a: calls.append(a[2].shape) or store(*a))

    cfg = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    text, mask = torch.randn(2, 5, cfg.text_hidden, generator=g), torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, cfg.vocab, (2, cfg.codebooks, 12), generator=g)
    outs = []
    for swap in (False, True):
        m = MusicGen.random(cfg, seed=3)
        m.cache_dtype = torch.int8
        undo = attention.install(m) if swap else None
        m.setup_caches(2, max_len=16, max_text=5)
        m.set_condition(text, mask)
        with torch.inference_mode():
            first = m.prefill(codes[..., :8])  # into the empty cache, then over what it filled:
            second = m.forward(codes[..., 8:12], torch.arange(8, 12), kv_len=12)
        outs.append((first, second, [c.k.clone() for c in m.caches]))
        if undo:
            undo()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2], strict=True))
    assert len(calls) == 2 * 2 * cfg.layers  # keys and values, each layer, both prefills: the kernel's path
