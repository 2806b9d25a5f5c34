"""What the kernels' software prefetch must not change: every product family and the attention
over each cache kind give the same bits at any prefetch distance (none, the Intel default, far
past the end of every buffer). Run by test_cpu_kernels.py on the native build and by
test_cpu_avx2.py inside its x86-64-v3 subprocess, so both builds' paths are covered."""

import torch

from musicsteer.kernels import cpu
from musicsteer.model.kv_cache import QuantizedKVCache

DISTANCES = (0, 8192, 1 << 20)


def same_at_every_distance(compute) -> None:
    before = cpu.prefetch()
    try:
        results = []
        for nbytes in DISTANCES:
            assert cpu.prefetch(nbytes) == nbytes and cpu.prefetch() == nbytes
            results.append(compute())
    finally:
        cpu.prefetch(before)
    for nbytes, got in zip(DISTANCES[1:], results[1:]):
        assert torch.equal(got, results[0]), f"prefetch {nbytes} bytes ahead changed the result"


def check_prefetch() -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(1024, 512, generator=g) * 0.05, torch.randn(2, 512, generator=g)
    f32, bf16 = cpu.pack_f32(w), cpu.pack_bf16(w)
    same_at_every_distance(lambda: cpu.linear_f32(f32, x))
    same_at_every_distance(lambda: cpu.linear_bf16(bf16, x))
    if cpu.has_int8():
        i8, i4 = cpu.quantize_pack_i8(w), cpu.quantize_pack_i4(w)
        same_at_every_distance(lambda: cpu.linear_i8(*i8, x))
        same_at_every_distance(lambda: cpu.linear_i4(*i4, x))
    B, H, hd, max_len, length = 2, 16, 64, 700, 650
    D = H * hd
    qkv = torch.randn(B, 3 * D, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        kc = torch.randn(B, H, max_len, hd, generator=g).to(dtype)
        vc = torch.randn(B, H, max_len, hd, generator=g).to(dtype)
        same_at_every_distance(lambda: cpu.attend(qkv[:, :D], None, kc, vc, length - 1, length))
    cache = QuantizedKVCache(B, H, max_len, hd, torch.float32, "cpu")
    cache.update(torch.arange(length), torch.randn(B, H, length, hd, generator=g), torch.randn(B, H, length, hd, generator=g))
    same_at_every_distance(lambda: cpu.attend(qkv[:, :D], None, cache.k, cache.v, length - 1, length,
                                              (cache.k_scale, cache.v_scale)))
