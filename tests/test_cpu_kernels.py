"""The C kernels for the CPU step: they build, they compute exactly what their formulas say,
and the decoder layers built on them equal the plain ones."""

import shutil

import pytest
import torch

from musicsteer.backends.cpu.linear import (
    PACKED_ROWS,
    Linear,
    PackedLinear,
    fuse_activations,
    optimize_for_cpu,
)
from musicsteer.kernels import cpu
from prefetch_check import check_prefetch

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler on this machine: the CPU kernels cannot be built")
needs_vnni = pytest.mark.skipif(not cpu.has_int8(), reason="this CPU or build has no AVX-512 VNNI for the int8 kernel")


@needs_cc
def test_the_library_builds_and_reports_what_it_has():
    assert cpu.library() is not None, cpu.unavailable()
    assert cpu.caps() & cpu.CAP_F32
    assert cpu.unavailable() is None


@needs_cc
@pytest.mark.parametrize("n,d", [(16, 64), (48, 72), (64, 1), (1024, 256), (32, 1030)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 20])
def test_float32_kernel_equals_the_product(n, d, rows):
    g = torch.Generator().manual_seed(n * 31 + d + rows)
    w, x = torch.randn(n, d, generator=g), torch.randn(rows, d, generator=g)
    packed = cpu.pack_f32(w)
    assert packed.shape == (n // 16, d, 16)
    torch.testing.assert_close(cpu.unpack_f32(packed), w, atol=0, rtol=0)
    want = (x.double() @ w.double().T).float()
    torch.testing.assert_close(cpu.linear_f32(packed, x), want, atol=2e-5 * d ** 0.5, rtol=1e-5)


def reference_int8(packed, scale, x):
    """What the int8 kernel computes, in float64: x quantized per 64-input group exactly as the C
    code does (float32 scale and reciprocal, round half to even, clamp to +-127)."""
    rows, d = x.shape
    groups = x.view(rows, d // 64, 64)
    top = groups.abs().amax(-1)
    xscale = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    inv = 1.0 / xscale
    xq = torch.round(groups * inv[..., None]).clamp(-127, 127)  # torch.round: half to even
    wq = cpu.dequantize_i8(packed, torch.ones_like(scale)).double()  # integers q
    per_group = torch.einsum("rgi,ngi->rgn", xq.double(), wq.view(-1, d // 64, 64))
    return (per_group * xscale.double()[..., None]).sum(1) * scale.double()


@needs_vnni
@pytest.mark.parametrize("n,d", [(16, 64), (48, 128), (1024, 512), (64, 4096)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17])
def test_int8_kernel_computes_its_formula(n, d, rows):
    g = torch.Generator().manual_seed(n + d * 7 + rows)
    w, x = torch.randn(n, d, generator=g) / d ** 0.5, torch.randn(rows, d, generator=g)
    if d > 64:
        x[0, :64] = 0  # an all-zero group takes the scale-1 branch
    packed, scale = cpu.quantize_pack_i8(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n // 16, d // 4, 16, 4)
    got = cpu.linear_i8(packed, scale, x).double()
    want = reference_int8(packed, scale, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    exact = x.double() @ w.double().T
    assert ((got - exact).norm() / exact.norm()) < 0.02  # and it is close to the float32 product


@needs_vnni
def test_int8_kernel_refuses_shapes_it_cannot_take():
    packed, scale = cpu.quantize_pack_i8(torch.randn(16, 128))
    with pytest.raises(RuntimeError, match="refused"):
        cpu.linear_i8(packed[:, :8], scale, torch.randn(1, 32))  # 32 inputs: not whole groups of 64


def test_huge_page_tensors_are_aligned_and_usable():
    t = cpu.huge_page_empty((3, 1024, 1024), torch.float32)
    assert t.shape == (3, 1024, 1024) and t.is_contiguous()
    assert t.data_ptr() % cpu.HUGE_PAGE == 0
    t.fill_(2.0)
    assert t.sum().item() == 2.0 * t.numel()
    small = cpu.huge_page_empty((10,), torch.float32)
    assert small.shape == (10,)


@needs_cc
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8, 1), (2, 16), (PACKED_ROWS + 1, 1), (3, 50), (2, 3 * PACKED_ROWS + 5)])
def test_packed_linear_equals_linear_for_steps_and_prefill(shape):
    lin = Linear(96, 48, bias=False)
    packed = PackedLinear(lin.weight)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)


@needs_cc
def test_optimize_for_cpu_packs_every_float32_bias_free_layer():
    model = torch.nn.Sequential(Linear(64, 256, bias=False), Linear(256, 64, bias=False),
                                Linear(64, 64, bias=True), Linear(64, 40, bias=False))
    optimize_for_cpu(model, packed=True)
    assert [type(m).__name__ for m in model] == ["PackedLinear", "PackedLinear", "Linear", "Linear"]


@needs_cc
def test_packed_decoder_steps_equal_the_plain_decoder():
    from musicsteer.model.config import PRESETS
    from musicsteer.model.musicgen import MusicGen

    cfg = PRESETS["tiny"]
    plain = MusicGen.random(cfg, seed=3).eval()
    fast = MusicGen.random(cfg, seed=3).eval()
    optimize_for_cpu(fast, packed=True)
    assert any(isinstance(m, PackedLinear) for m in fast.modules())
    assert fuse_activations(fast) == cfg.layers and all(b.fused_act for b in fast.blocks)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 5, cfg.text_hidden, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, cfg.vocab, (2, cfg.codebooks, 12), generator=g)
    outs = []
    for m in (plain, fast):
        m.setup_caches(2, max_len=16, max_text=5)
        m.set_condition(text, mask)
        with torch.inference_mode():
            first = m.prefill(codes[..., :8])[:, -1]  # 16 rows: the packed kernel in 2 passes
            steps = [m.step(codes[..., t:t + 1], torch.tensor([t])) for t in range(8, 12)]
        outs.append(torch.stack([first, *steps]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


@needs_cc
@pytest.mark.parametrize("batch,heads,hd,max_len,length", [(2, 16, 64, 64, 1), (2, 16, 64, 1500, 1499), (1, 4, 12, 40, 17),
                                                        (2, 3, 100, 9, 9), (2, 2, 256, 5000, 4500), (3, 1, 16, 33, 20)])
def test_attention_kernel_writes_the_cache_and_equals_sdpa(batch, heads, hd, max_len, length):
    g = torch.Generator().manual_seed(length + hd)
    D = heads * hd
    kc, vc = torch.randn(batch, heads, max_len, hd, generator=g), torch.randn(batch, heads, max_len, hd, generator=g)
    qkv = torch.randn(batch, 3 * D, generator=g) * 2
    before_k, before_v = kc.clone(), vc.clone()
    pos = length - 1
    out = cpu.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), kc, vc, pos, length)
    want_k, want_v = before_k.clone(), before_v.clone()
    want_k[:, :, pos] = qkv[:, D:2 * D].view(batch, heads, hd)
    want_v[:, :, pos] = qkv[:, 2 * D:].view(batch, heads, hd)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # written at pos, nothing else touched
    q = qkv[:, :D].reshape(batch, heads, 1, hd)
    want = torch.nn.functional.scaled_dot_product_attention(q, want_k[:, :, :length], want_v[:, :, :length])
    torch.testing.assert_close(out, want.reshape(batch, D), atol=2e-5, rtol=1e-4)


@needs_cc
def test_attention_kernel_reads_only_the_filled_part_and_refuses_overruns():
    kc, vc = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    q = torch.randn(2, 32)
    a = cpu.attend(q, None, kc, vc, -1, 4)
    kc[:, :, 4:] = float("nan")  # past the length: never read
    vc[:, :, 4:] = float("nan")
    torch.testing.assert_close(cpu.attend(q, None, kc, vc, -1, 4), a)
    with pytest.raises(RuntimeError, match="refused"):
        cpu.attend(q, None, kc, vc, -1, 11)
    with pytest.raises(RuntimeError, match="refused"):
        cpu.attend(q, (q, q), kc, vc, 10, 10)


@needs_cc
@pytest.mark.parametrize("hd,length", [(64, 300), (12, 7), (100, 33)])
def test_attention_kernel_on_a_bfloat16_cache(hd, length):
    g = torch.Generator().manual_seed(hd)
    B, H, max_len = 2, 3, 320
    D = H * hd
    kc = torch.randn(B, H, max_len, hd, generator=g).bfloat16()
    vc = torch.randn(B, H, max_len, hd, generator=g).bfloat16()
    qkv = torch.randn(B, 3 * D, generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    pos = length - 1
    want_k[:, :, pos] = qkv[:, D:2 * D].view(B, H, hd).bfloat16()  # torch's rounding: nearest even
    want_v[:, :, pos] = qkv[:, 2 * D:].view(B, H, hd).bfloat16()
    out = cpu.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), kc, vc, pos, length)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    q = qkv[:, :D].reshape(B, H, 1, hd)
    want = torch.nn.functional.scaled_dot_product_attention(q, want_k[:, :, :length].float(),
                                                            want_v[:, :, :length].float())
    torch.testing.assert_close(out, want.reshape(B, D), atol=2e-5, rtol=1e-4)


@needs_cc
@pytest.mark.parametrize("hd,length", [(64, 301), (64, 1), (12, 7), (100, 33)])
def test_attention_kernel_on_an_int8_cache(hd, length):
    """The kernel quantizes the new key and value exactly as QuantizedKVCache does (bit for bit, scales
    included) and attends over the int8 cache to within float32 rounding of SDPA over its dequantized form."""
    from musicsteer.model.kv_cache import QuantizedKVCache

    g = torch.Generator().manual_seed(hd + length)
    B, H, max_len = 2, 3, 320
    D = H * hd
    ours, want = (QuantizedKVCache(B, H, max_len, hd, torch.float32, "cpu") for _ in range(2))
    old = (torch.randn(B, H, length - 1, hd, generator=g) * 3, torch.randn(B, H, length - 1, hd, generator=g))
    for cache in (ours, want):
        cache.update(torch.arange(length - 1), *old)
    qkv = torch.randn(B, 3 * D, generator=g)
    qkv[0, D:D + hd] = 0  # an all-zero head: scale 0, values 0
    pos = length - 1
    out = cpu.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), ours.k, ours.v, pos, length,
                     (ours.k_scale, ours.v_scale))
    k, v = want.update(torch.tensor([pos]), qkv[:, D:2 * D].view(B, H, 1, hd), qkv[:, 2 * D:].view(B, H, 1, hd), length)
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(ours, name), getattr(want, name)), name
    assert ours.k_scale[0, 0, pos] == 0 and not ours.k[0, 0, pos].any()
    q = qkv[:, :D].reshape(B, H, 1, hd)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref.reshape(B, D), atol=2e-5, rtol=1e-4)
    with pytest.raises(AssertionError, match="scales"):
        cpu.attend(qkv[:, :D], None, ours.k, ours.v, -1, length)


def test_a_bfloat16_cache_decoder_follows_the_float32_one(tiny):
    from musicsteer.model.config import PRESETS
    from musicsteer.model.musicgen import MusicGen

    cfg = PRESETS["tiny"]
    g = torch.Generator().manual_seed(0)
    text, mask = torch.randn(2, 5, cfg.text_hidden, generator=g), torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, cfg.vocab, (2, cfg.codebooks, 12), generator=g)
    outs = []
    for cache_dtype in (None, torch.bfloat16):
        m = MusicGen.random(cfg, seed=3).eval()
        m.cache_dtype = cache_dtype
        m.setup_caches(2, max_len=16, max_text=5)
        assert m.caches[0].k.dtype == (cache_dtype or torch.float32)
        m.set_condition(text, mask)
        with torch.inference_mode():
            first = m.prefill(codes[..., :8])[:, -1]
            steps = [m.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(8, 12)]
            static = m.step(codes[..., 11:12], torch.tensor([11]))  # the masked path reads it too
        outs.append(torch.stack([first, *steps, static]))
    a, b = outs
    assert ((a - b).norm() / a.norm()) < 0.01
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


@needs_cc
def test_packed_layers_follow_a_replaced_buffer():
    from musicsteer.backends.cpu.int8 import PackedInt8Linear

    w1, w2 = torch.randn(32, 64), torch.randn(32, 64)
    x = torch.randn(2, 1, 64)
    layer = PackedLinear(w1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w1.T, atol=1e-5, rtol=1e-5)
        layer.packed = cpu.pack_f32(w2)  # as load_state_dict(assign=True) would
        torch.testing.assert_close(layer(x), x @ w2.T, atol=1e-5, rtol=1e-5)
    if cpu.has_int8():
        q = PackedInt8Linear(w1)
        with torch.no_grad():
            first = q(x)
            packed, scale = cpu.quantize_pack_i8(w2)
            q.packed, q.scale = packed, scale
            assert ((q(x) - x @ w2.T).norm() / (x @ w2.T).norm()) < 0.02
            assert not torch.allclose(q(x), first)


PORTABLE_CHECK = """
import torch
from musicsteer.kernels import cpu
assert cpu.caps() == cpu.CAP_F32, cpu.caps()  # no AVX-512 in this build: the portable loops
assert not cpu.has_int8()
g = torch.Generator().manual_seed(0)
w, x = torch.randn(48, 72, generator=g), torch.randn(3, 72, generator=g)
assert not cpu.has_bf16()  # bfloat16 weights: the portable loop, with the same rounding of x
torch.testing.assert_close(cpu.linear_bf16(cpu.pack_bf16(w), x),
                           (x.bfloat16().double() @ w.bfloat16().double().T).float(), atol=1e-4, rtol=1e-5)
torch.testing.assert_close(cpu.linear_f32(cpu.pack_f32(w), x), x @ w.T, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(cpu.linear_f32(cpu.pack_f32(w), x, cpu.ACTIVATIONS["gelu"]),
                           torch.nn.functional.gelu(x @ w.T), atol=1e-4, rtol=1e-4)
for dtype in (torch.float32, torch.bfloat16):
    kc, vc = torch.randn(2, 3, 20, 12, generator=g).to(dtype), torch.randn(2, 3, 20, 12, generator=g).to(dtype)
    q = torch.randn(2, 36, generator=g)
    out = cpu.attend(q, None, kc, vc, -1, 13)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, 3, 1, 12), kc[:, :, :13].float(), vc[:, :, :13].float())
    torch.testing.assert_close(out, want.reshape(2, 36), atol=1e-5, rtol=1e-4)
# whole blocks as C calls (backends/cpu/fused.py) over the portable loops
from musicsteer.model.config import PRESETS
from musicsteer.backends.cpu.fused import fuse_blocks, unfuse_blocks
from musicsteer.backends.cpu.linear import optimize_for_cpu
from musicsteer.model.musicgen import MusicGen
model = optimize_for_cpu(MusicGen.random(PRESETS["tiny"], seed=1), packed=True)
codes = torch.randint(0, model.cfg.vocab, (2, model.cfg.codebooks, 6), generator=g)
runs = []
for fused in (False, True):
    model.setup_caches(2, max_len=8, max_text=4)
    model.set_condition(torch.randn(2, 3, model.cfg.text_hidden, generator=torch.Generator().manual_seed(1)),
                        torch.ones(2, 3))
    if fused:
        assert fuse_blocks(model) == model.cfg.layers
    else:
        unfuse_blocks(model)
    with torch.no_grad():
        runs.append(torch.stack([model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(6)]))
torch.testing.assert_close(runs[1], runs[0], atol=2e-5, rtol=1e-5)
from musicsteer.backends.cpu.bf16 import to_bf16  # bfloat16 blocks (KIND_BF16) over the portable loop
model = to_bf16(MusicGen.random(PRESETS["tiny"], seed=1))
model.cache_dtype = torch.bfloat16
runs = []
for fused in (False, True):
    model.setup_caches(2, max_len=8, max_text=4)
    model.set_condition(torch.randn(2, 3, model.cfg.text_hidden, generator=torch.Generator().manual_seed(1)),
                        torch.ones(2, 3))
    if fused:
        assert fuse_blocks(model) == model.cfg.layers
    else:
        unfuse_blocks(model)
    with torch.no_grad():
        runs.append(torch.stack([model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(6)]))
torch.testing.assert_close(runs[1], runs[0], atol=5e-5, rtol=1e-4)
print("portable ok")
"""


@needs_cc
def test_the_portable_build_computes_the_same(tmp_path):
    """Machines without AVX-512 get the plain C loops (-march=x86-64-v2 here builds them)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MUSICSTEER_CPU_MARCH="x86-64-v2", MUSICSTEER_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "portable ok" in done.stdout


ACTS = {"gelu": torch.nn.functional.gelu, "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
        "relu": torch.nn.functional.relu}


@needs_cc
@pytest.mark.parametrize("name", sorted(ACTS))
@pytest.mark.parametrize("rows", [1, 2, 9, PACKED_ROWS + 3])
def test_fused_activation_equals_the_activation_after_the_product(name, rows):
    from musicsteer.backends.cpu.int8 import PackedInt8Linear

    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(48, 128, generator=g) / 4, torch.randn(rows, 1, 128, generator=g)
    layer = PackedLinear(w)
    layer.fuse_activation(name)
    want = ACTS[name](x @ w.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=2e-6 * 16, rtol=1e-5)
    if cpu.has_int8():
        q = PackedInt8Linear(w)
        with torch.no_grad():
            plain = q(x)
            q.fuse_activation(name)
            torch.testing.assert_close(q(x), ACTS[name](plain), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="swish"):
        layer.fuse_activation("swish")


needs_tiles = pytest.mark.skipif(not cpu.use_tiles(), reason="this CPU, build or kernel has no usable AMX tiles")


@needs_tiles
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows,act", [(16, 0), (37, 1), (64, 0), (300, 2), (512, 3)])
def test_products_on_amx_tiles_equal_the_vnni_kernel_bit_for_bit(kind, rows, act):
    """16 rows or more run on AMX tiles; each group's exact int32 sums take the VNNI kernel's float32
    steps in the same order, so the outputs are the same bits (row counts off the tile size included)."""
    from musicsteer.backends.cpu.int4 import PackedInt4Linear
    from musicsteer.backends.cpu.int8 import PackedInt8Linear

    g = torch.Generator().manual_seed(rows)
    layer = (PackedInt8Linear if kind == "int8" else PackedInt4Linear)(torch.randn(256, 320, generator=g) * 0.05)
    layer._act = act  # the fused activations of the products' epilogue
    layer._bind()
    x = torch.randn(rows, 320, generator=g) * torch.logspace(-2, 1, 320)  # groups of very different scales
    try:
        tiles = layer._kernel(x, rows)
        cpu.use_tiles(False)
        assert not cpu.use_tiles()
        vnni = layer._kernel(x, rows)
    finally:
        cpu.use_tiles(True)
    assert torch.equal(tiles, vnni)
    want = torch.nn.functional.linear(x, layer.weight)
    want = [want, torch.nn.functional.gelu(want), torch.nn.functional.gelu(want, approximate="tanh"),
            torch.relu(want)][act]
    assert (tiles - want).abs().max() < 0.02 * want.abs().max()  # and both are the product they claim


@needs_tiles
def test_a_prefill_takes_the_tiles_in_one_call_per_layer(monkeypatch):
    from musicsteer.backends.cpu import linear
    from musicsteer.backends.cpu.int8 import PackedInt8Linear

    layer = PackedInt8Linear(torch.randn(64, 128) * 0.05)
    calls = []
    kernel = layer._kernel
    monkeypatch.setattr(layer, "_kernel", lambda x, rows: calls.append(rows) or kernel(x, rows))
    with torch.no_grad():
        layer(torch.randn(600, 128))
        assert calls == [linear.TILE_ROWS, 600 - linear.TILE_ROWS]
        calls.clear()
        cpu.use_tiles(False)
        try:
            layer(torch.randn(70, 128))
        finally:
            cpu.use_tiles(True)
    assert calls == [32, 32, 6]


@needs_cc
def test_prefetching_changes_no_result():
    check_prefetch()


def test_the_prefetch_distance_comes_from_the_environment_else_the_vendor(monkeypatch, caplog):
    monkeypatch.delenv(cpu.PREFETCH_ENV, raising=False)
    monkeypatch.setattr(cpu, "_vendor", lambda: "GenuineIntel")
    assert cpu.default_prefetch() == 8192
    monkeypatch.setattr(cpu, "_vendor", lambda: "AuthenticAMD")
    assert cpu.default_prefetch() == 0
    for value, want in (("4096", 4096), ("0", 0), ("-5", 0)):
        monkeypatch.setenv(cpu.PREFETCH_ENV, value)
        assert cpu.default_prefetch() == want
    monkeypatch.setenv(cpu.PREFETCH_ENV, "far")
    assert cpu.default_prefetch() == 0  # the vendor's default, with a warning
    assert "MUSICSTEER_CPU_PREFETCH='far' is not a number of bytes" in caplog.text


@needs_cc
def test_the_prefetch_distance_is_reported_with_the_kernel_paths():
    before = cpu.prefetch()
    try:
        cpu.prefetch(4096)
        assert cpu.paths()["prefetch"] == "4096"
    finally:
        cpu.prefetch(before)


@needs_cc
def test_the_prefetch_benchmark_times_every_distance_in_turns(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "prefetch.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_prefetch.py"), "--model", "tiny", "--weights",
                           "int8", "--kv-cache", "bf16", "--frames", "80", "--rounds", "1", "--distances", "0,4096",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["p50_ms"]) == {"0", "4096"} and all(v > 0 for v in record["p50_ms"].values())
    assert all(len(record["steps_ms"][d]) >= 20 for d in ("0", "4096"))  # both took turns along the generation
    assert record["fastest_bytes"] in (0, 4096) and record["machine"]["cpu_kernels"]["prefetch"] == str(
        record["default_bytes"])  # the default is back in place when the record is made
