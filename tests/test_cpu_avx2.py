"""The x86-64-v3 build of the CPU kernels (kernels/cpu_avx2.h and the AVX2/FMA branches of
cpu_gemv.c, cpu_reduced.c, cpu_block.c): built with -march=x86-64-v3 in a subprocess, it reports
AVX2 paths for every kernel family, holds no AVX-512 instruction, and each family equals its
float64 reference within the tolerances of the AVX-512 tests (int8 and int4 exactly in their
integer sums, including the pairs where vpmaddubsw would saturate if misused)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _cpu_flags() -> set[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


pytestmark = [
    pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                       reason="no C compiler on this machine: the CPU kernels cannot be built"),
    pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(),
                       reason="this CPU has no AVX2 and FMA: it cannot run the x86-64-v3 build"),
]

V3_CHECK = r"""
import torch
from musicsteer.kernels import cpu

F = torch.nn.functional
assert cpu.unavailable() is None, cpu.unavailable()
assert {k: v for k, v in cpu.paths().items() if k != "prefetch"} == {"f32": "avx2", "i8": "avx2", "i4": "avx2", "bf16": "avx2", "attend": "avx2", "codec": "avx2"}, cpu.paths()
assert cpu.caps() == cpu.CAP_F32 | cpu.CAP_INT8_AVX2, cpu.caps()  # no AVX-512 bit in this build
assert cpu.has_int8() and not cpu.has_bf16()
g = torch.Generator().manual_seed(0)
ACTS = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}


def rows_q(x):
    # x as the int8 and int4 kernels quantize it: per row and group of 64, float32 scale, half to even
    groups = x.view(x.shape[0], -1, 64)
    top = groups.abs().amax(-1)
    scale = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    return torch.round(groups * (1.0 / scale)[..., None]).clamp(-127, 127), scale


def ref_i8(packed, scale, x):
    xq, xs = rows_q(x)
    wq = cpu.dequantize_i8(packed, torch.ones_like(scale)).double().view(-1, x.shape[1] // 64, 64)
    return (torch.einsum("rgi,ngi->rgn", xq.double(), wq) * xs.double()[..., None]).sum(1) * scale.double()


def ref_i4(packed, scale, x):
    xq, xs = rows_q(x)
    dq = cpu.dequantize_i4(packed, scale).double()
    return (xq.double() * xs.double()[..., None]).view_as(x) @ dq.T


# float32: both halves in one pass (rows <= 4) or one per pass, an unrolled body and a tail
for n, d in [(16, 64), (48, 72), (64, 1), (1024, 256), (32, 1030)]:
    for rows in (1, 2, 3, 5, 8, 9):
        w, x = torch.randn(n, d, generator=g), torch.randn(rows, d, generator=g)
        want = (x.double() @ w.double().T).float()
        torch.testing.assert_close(cpu.linear_f32(cpu.pack_f32(w), x), want, atol=2e-5 * d ** 0.5, rtol=1e-5)

# int8: the integer sums are exact, also where every pair of products is +-2 * 127 * 127
for n, d in [(16, 64), (48, 128), (1024, 512), (64, 4096)]:
    for rows in (1, 2, 3, 7, 9, 17):
        w, x = torch.randn(n, d, generator=g) / d ** 0.5, torch.randn(rows, d, generator=g)
        x[0, :64] = 0  # an all-zero group: the scale-1 branch
        packed, scale = cpu.quantize_pack_i8(w)
        torch.testing.assert_close(cpu.linear_i8(packed, scale, x).double(), ref_i8(packed, scale, x), atol=1e-5, rtol=1e-5)
signs = torch.randint(0, 2, (32, 256), generator=g).float() * 2 - 1
w, x = signs, torch.cat([signs[:1], -signs[:1], torch.ones(1, 256)])  # q = +-127, x_q = +-127, aligned
packed, scale = cpu.quantize_pack_i8(w)
got = cpu.linear_i8(packed, scale, x)
torch.testing.assert_close(got.double(), ref_i8(packed, scale, x), atol=1e-5, rtol=1e-6)
assert abs(got[0, 0].item() - 256.0) < 1e-3 and abs(got[1, 0].item() + 256.0) < 1e-3, got[:2, 0]

# int4: exact integer sums against the quantized rows, also with every nibble at +-7 against +-127
for n, d in [(96, 256), (48, 64), (1024, 4096)]:
    for rows in (1, 2, 3, 9):
        w, x = torch.randn(n, d, generator=g) * 0.05, torch.randn(rows, d, generator=g)
        packed, scale = cpu.quantize_pack_i4(w)
        want = ref_i4(packed, scale, x)
        got = cpu.linear_i4(packed, scale, x).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, (n, d, rows)
packed, scale = cpu.quantize_pack_i4(signs)
x = torch.cat([signs[:1], -signs[:1]])
got = cpu.linear_i4(packed, scale, x)
s7 = 7 * torch.tensor(1 / 7).bfloat16().item()  # a group of +-1 at scale 1/7, rounded to bfloat16
assert (got.double() - ref_i4(packed, scale, x)).abs().max() < 1e-4 and abs(got[0, 0].item() - 256.0 * s7) < 1e-3

# bfloat16: x and W rounded to nearest even, float32 sums
for n, d in [(96, 256), (48, 72), (16, 2), (1024, 4096)]:
    for rows in (1, 2, 3, 9):
        w, x = torch.randn(n, d, generator=g) * 0.05, torch.randn(rows, d, generator=g)
        want = (x.bfloat16().double() @ w.bfloat16().double().T).float()
        got = cpu.linear_bf16(cpu.pack_bf16(w), x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6, (n, d, rows)

# each product's fused activation equals the activation after the plain product
w, x = torch.randn(48, 128, generator=g) / 4, torch.randn(2, 128, generator=g)
pf, (p8, s8), (p4, s4), pb = cpu.pack_f32(w), cpu.quantize_pack_i8(w), cpu.quantize_pack_i4(w), cpu.pack_bf16(w)
for name, fn in ACTS.items():
    act = cpu.ACTIVATIONS[name]
    torch.testing.assert_close(cpu.linear_f32(pf, x, act), fn(x @ w.T), atol=2e-6 * 16, rtol=1e-5)
    torch.testing.assert_close(cpu.linear_i8(p8, s8, x, act), fn(cpu.linear_i8(p8, s8, x)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cpu.linear_i4(p4, s4, x, act), fn(cpu.linear_i4(p4, s4, x)), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cpu.linear_bf16(pb, x, act), fn(cpu.linear_bf16(pb, x)), atol=2e-6, rtol=1e-5)

# attention over a float32 and a bfloat16 cache: whole chunks of 8, a scalar tail, heads below 8
for dtype in (torch.float32, torch.bfloat16):
    for B, H, hd, max_len, length in [(2, 16, 64, 64, 1), (2, 16, 64, 400, 333), (1, 4, 12, 40, 17),
                                      (2, 3, 100, 9, 9), (2, 2, 256, 600, 555), (1, 2, 3, 20, 6)]:
        D = H * hd
        kc = torch.randn(B, H, max_len, hd, generator=g).to(dtype)
        vc = torch.randn(B, H, max_len, hd, generator=g).to(dtype)
        qkv = torch.randn(B, 3 * D, generator=g) * 2
        pos = length - 1
        want_k, want_v = kc.clone(), vc.clone()
        want_k[:, :, pos] = qkv[:, D:2 * D].view(B, H, hd).to(dtype)
        want_v[:, :, pos] = qkv[:, 2 * D:].view(B, H, hd).to(dtype)
        out = cpu.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), kc, vc, pos, length)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
        want = F.scaled_dot_product_attention(qkv[:, :D].reshape(B, H, 1, hd), want_k[:, :, :length].float(),
                                              want_v[:, :, :length].float())
        torch.testing.assert_close(out, want.reshape(B, D), atol=2e-5, rtol=1e-4)

# attention over an 8-bit cache: the new key and value quantized as QuantizedKVCache does them (bit for
# bit, scales included), the attention within float32 rounding of SDPA over the dequantized cache
from musicsteer.model.kv_cache import QuantizedKVCache

for B, H, hd, max_len, length in [(2, 16, 64, 400, 333), (2, 16, 64, 64, 1), (1, 4, 12, 40, 17), (2, 3, 100, 40, 33)]:
    D = H * hd
    ours, ref = (QuantizedKVCache(B, H, max_len, hd, torch.float32, "cpu") for _ in range(2))
    old = (torch.randn(B, H, length - 1, hd, generator=g) * 3, torch.randn(B, H, length - 1, hd, generator=g))
    for cache in (ours, ref):
        cache.update(torch.arange(length - 1), *old)
    qkv = torch.randn(B, 3 * D, generator=g)
    pos = length - 1
    out = cpu.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), ours.k, ours.v, pos, length,
                     (ours.k_scale, ours.v_scale))
    k, v = ref.update(torch.tensor([pos]), qkv[:, D:2 * D].view(B, H, 1, hd), qkv[:, 2 * D:].view(B, H, 1, hd), length)
    assert all(torch.equal(getattr(ours, n), getattr(ref, n)) for n in ("k", "v", "k_scale", "v_scale")), (hd, length)
    want = F.scaled_dot_product_attention(qkv[:, :D].reshape(B, H, 1, hd), k, v)
    torch.testing.assert_close(out, want.reshape(B, D), atol=2e-5, rtol=1e-4)

# whole blocks as C calls (backends/cpu/fused.py) equal the module path, for each weight format
from musicsteer.backends.cpu.bf16 import to_bf16
from musicsteer.backends.cpu.fused import fuse_blocks, unfuse_blocks
from musicsteer.backends.cpu.int4 import quantize_int4
from musicsteer.backends.cpu.int8 import quantize_int8
from musicsteer.backends.cpu.linear import fuse_activations, optimize_for_cpu
from musicsteer.model.config import PRESETS
from musicsteer.model.musicgen import MusicGen

makers = {"f32": lambda m: optimize_for_cpu(m, packed=True), "bf16": to_bf16, "int8": quantize_int8,
          "int4": quantize_int4}
for name, make in [*makers.items(), ("int4 with an int8 cache", quantize_int4)]:
    model = MusicGen.random(PRESETS["tiny"], seed=1)
    make(model)
    fuse_activations(model)
    if name != "f32":
        model.cache_dtype = torch.int8 if "int8 cache" in name else torch.bfloat16
    codes = torch.randint(0, model.cfg.vocab, (2, model.cfg.codebooks, 6), generator=g)
    runs = []
    for fused in (False, True):
        model.setup_caches(2, max_len=8, max_text=4)
        model.set_condition(torch.randn(2, 3, model.cfg.text_hidden, generator=torch.Generator().manual_seed(1)),
                            torch.ones(2, 3))
        if fused:
            assert fuse_blocks(model) == model.cfg.layers, name
        else:
            unfuse_blocks(model)
        with torch.no_grad():
            runs.append(torch.stack([model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(6)]))
    torch.testing.assert_close(runs[1], runs[0], atol=5e-5, rtol=1e-4, msg=name)
from prefetch_check import check_prefetch

check_prefetch()
print("v3 ok", cpu._build())
"""


def run_v3(tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MUSICSTEER_CPU_MARCH="x86-64-v3", MUSICSTEER_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", V3_CHECK], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def v3_run(tmp_path_factory):
    return run_v3(tmp_path_factory.mktemp("v3"))


def test_the_x86_64_v3_build_uses_avx2_and_computes_every_kernel_family(v3_run):
    assert v3_run.returncode == 0, v3_run.stderr[-3000:]
    assert "v3 ok" in v3_run.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump (binutils) to disassemble the library")
def test_the_x86_64_v3_library_holds_ymm_code_and_no_avx512(v3_run):
    assert v3_run.returncode == 0, v3_run.stderr[-3000:]
    library = v3_run.stdout.split("v3 ok", 1)[1].strip()
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                          check=True).stdout
    assert "vpmaddubsw" in code and "vfmadd" in code and "%ymm" in code
    assert "%zmm" not in code and "vpdpbusd" not in code and "%k1" not in code
