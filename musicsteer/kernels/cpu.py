"""Threading model: `library()` builds and loads the kernels once per process, under a lock
(the first caller may be the producer thread, a benchmark, or a test's worker; later
callers get the loaded library without locking). The kernels themselves are called from
one thread at a time per decoder (the forward's thread) and release the GIL; each call
runs its own OpenMP region.

The CPU weight-product kernels of `cpu_gemv.c`: build, load, pack, call.

The C source is compiled on first use with the system C compiler (`cc`, `-O3 -march=native`)
into a cache directory keyed by the source, the compiler and the CPU, and loaded with ctypes
(the call releases the GIL). `MUSICSTEER_CPU_KERNELS=0` turns them off; without a compiler
they are absent and the decoder keeps its torch path, and `unavailable()` says why.

Packed weights live in memory advised for transparent huge pages: on the 2-core test
machines a streaming read over 4 KiB pages tops out near 33 GB/s and over 2 MiB pages
near 58 GB/s, because every 4 KiB of weights otherwise costs a page walk.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.c")  # includes cpu_reduced.c, cpu_amx.c, cpu_block.c and cpu_codec.c
SOURCES = (SOURCE, SOURCE.with_name("cpu_reduced.c"), SOURCE.with_name("cpu_amx.c"), SOURCE.with_name("cpu_block.c"),
           SOURCE.with_name("cpu_codec.c"), SOURCE.with_name("cpu_codec_math.c"), SOURCE.with_name("cpu_avx2.h"))
MARCH = os.environ.get("MUSICSTEER_CPU_MARCH", "native")  # x86-64-v2: the portable build; x86-64-v3: AVX2
FLAGS = ["-O3", f"-march={MARCH}", "-fPIC", "-shared", "-std=c11", "-D_GNU_SOURCE", "-fopenmp"]
CAP_F32, CAP_AVX512, CAP_VNNI, CAP_BF16 = 1, 2, 4, 8
CAP_INT8_AVX2 = 16  # int8 and int4 products on AVX2 (vpmaddubsw) in a build without VNNI
BLOCK = 16       # output channels per packed block
GROUP = 64       # int8: inputs per activation scale
MAX_ROWS = 8     # rows per pass over the weights
ACTIVATIONS = {"gelu": 1, "gelu_tanh": 2, "relu": 3}  # what a product's epilogue can apply (cpu_gemv.c)

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False
_load_lock = threading.Lock()


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo, whole ("vendor_id : GenuineIntel"), or None."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((ln for ln in lines if ln.startswith(field)), "")


def _cpu_key() -> str:
    model, flags = _cpuinfo("model name"), _cpuinfo("flags")
    return platform.processor() if model is None else model + flags


def cache_dir() -> Path:
    root = os.environ.get("MUSICSTEER_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "musicsteer")
    return Path(root) / "kernels"


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode() + version.encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out), "-lpthread", "-lm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
        os.replace(out, target)  # atomic: concurrent builders all end with one good file
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (see `unavailable`)."""
    if _loaded:  # set only once the library (or the reason it is absent) is in place
        return _lib
    with _load_lock:
        if not _loaded:
            _load()
    return _lib


def _load() -> None:
    global _lib, _loaded
    try:
        _lib = _open()
    finally:
        _loaded = True


def _open() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("MUSICSTEER_CPU_KERNELS", "1") in ("0", "off", "torch"):
        _reason = "turned off by MUSICSTEER_CPU_KERNELS"
        return None
    if platform.system() != "Linux":
        _reason = f"the CPU kernels are built for Linux, not {platform.system()}"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"could not build the CPU kernels: {e}"
        log.warning("%s; the decoder uses torch's products", _reason)
        return None
    lib.ms_caps.restype = ctypes.c_int
    lib.ms_paths.restype = ctypes.c_char_p
    lib.ms_linear_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.ms_linear_f32.restype = None
    lib.ms_linear_i8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.ms_linear_i8.restype = ctypes.c_int
    lib.ms_linear_i4.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.ms_linear_i4.restype = ctypes.c_int
    lib.ms_linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    lib.ms_linear_bf16.restype = ctypes.c_int
    lib.ms_attend.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6 + [
        ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.ms_attend.restype = ctypes.c_int
    lib.ms_kv_store_i8.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int] + [
        ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int]
    lib.ms_kv_store_i8.restype = ctypes.c_int
    lib.ms_block.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 10
    lib.ms_block.restype = ctypes.c_int
    lib.ms_blocks.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4
    lib.ms_blocks.restype = ctypes.c_int
    lib.ms_blocks_side.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 6
    lib.ms_blocks_side.restype = ctypes.c_int
    lib.ms_amx.argtypes = [ctypes.c_int]
    lib.ms_amx.restype = ctypes.c_int
    lib.ms_set_prefetch.argtypes = [ctypes.c_int]
    lib.ms_set_prefetch.restype = ctypes.c_int
    lib.ms_set_prefetch(default_prefetch())
    return lib


PREFETCH_ENV = "MUSICSTEER_CPU_PREFETCH"
PREFETCH_BY_VENDOR = {"GenuineIntel": 8192}  # bytes ahead; other vendors: none (docs/cpu-kernels.md)


def _vendor() -> str:
    line = _cpuinfo("vendor_id") or ""
    return line.split(":", 1)[1].strip() if ":" in line else ""


def default_prefetch() -> int:
    """How far ahead (bytes) the products and the attention prefetch what they stream:
    $MUSICSTEER_CPU_PREFETCH where set (0 turns it off), else by the CPU's vendor. On the Intel Xeon
    test hosts 8 KiB ahead made the products 11-31% faster; on the AMD EPYC ones 4 KiB ahead made
    them 20-30% slower, so AMD (and anything unmeasured) streams on its hardware prefetchers alone."""
    value = os.environ.get(PREFETCH_ENV, "").strip()
    if value:
        try:
            return max(0, int(value))
        except ValueError:
            log.warning("%s=%r is not a number of bytes; using the default", PREFETCH_ENV, value)
    return PREFETCH_BY_VENDOR.get(_vendor(), 0)


def prefetch(nbytes: int | None = None) -> int:
    """The prefetch distance in use (bytes, 0: none); `nbytes` sets it for this process first
    (benchmarks compare distances in turns)."""
    lib = library()
    if lib is None:
        return 0
    if nbytes is None:
        return lib.ms_set_prefetch(-1)  # reads it
    lib.ms_set_prefetch(max(0, int(nbytes)))
    return max(0, int(nbytes))


def use_tiles(on: bool | None = None) -> bool:
    """Whether int8 and int4 products of 16 rows or more run on AMX tiles (cpu_amx.c): where the build
    and the kernel allow them, unless turned off; `on` turns them off or back on for this process
    (tests compare both paths; the results are equal bit for bit)."""
    lib = _lib or library()
    return lib is not None and bool(lib.ms_amx(-1 if on is None else int(on)))


def unavailable() -> str | None:
    """Why the kernels are not in use, or None when they are."""
    library()
    return _reason


def caps() -> int:
    lib = library()
    return lib.ms_caps() if lib is not None else 0


def has_int8() -> bool:
    """Whether the int8 and int4 products are compiled: AVX-512 VNNI, or AVX2 without it."""
    return bool(caps() & (CAP_VNNI | CAP_INT8_AVX2))


def paths() -> dict[str, str]:
    """Which path each kernel family was compiled with: {"f32", "i8", "i4", "bf16", "attend"} ->
    "avx512" / "vnni" / "avx512bf16", "avx2", "portable" or "none" (int8 and int4 absent); {}
    without the library."""
    lib = library()
    if lib is None:
        return {}
    found = dict(item.split("=", 1) for item in lib.ms_paths().decode().split())
    found["prefetch"] = str(prefetch())
    return found


def has_bf16() -> bool:
    """Whether the bfloat16 products run on AVX-512 BF16 (vdpbf16ps); without it the library's
    bfloat16 entry point is a portable loop (same rounding, slower)."""
    return bool(caps() & CAP_BF16)


# ---------------------------------------------------------------- memory

HUGE_PAGE = 2 * 1024 * 1024


def huge_pages(nbytes: int) -> torch.Tensor:
    """`nbytes` of uninitialised uint8 memory starting on a 2 MiB boundary, advised for transparent
    huge pages before anything touches it (a no-op where THP is off). A fresh anonymous mapping,
    not the allocator's: memory malloc hands back after a free was already touched in 4 KiB pages,
    and advice does not change those (a `small` model's packed weights ended up with none). The
    tensor keeps the mapping alive."""
    import mmap

    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    return raw[offset:offset + nbytes]


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor on huge pages (`huge_pages`). Small tensors get ordinary memory."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or platform.system() != "Linux":
        return torch.empty(shape, dtype=dtype)
    return huge_pages(nbytes).view(dtype).view(shape)


# ---------------------------------------------------------------- packing

def pack_f32(weight: torch.Tensor) -> torch.Tensor:
    """(N, D) float32 -> (N/16, D, 16): each block of 16 outputs one contiguous run."""
    n, d = weight.shape
    packed = huge_page_empty((n // BLOCK, d, BLOCK), torch.float32)
    packed.copy_(weight.detach().float().view(n // BLOCK, BLOCK, d).transpose(1, 2))
    return packed


def unpack_f32(packed: torch.Tensor) -> torch.Tensor:
    nb, d, _ = packed.shape
    return packed.transpose(1, 2).reshape(nb * BLOCK, d)


def quantize_pack_i8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel, stored as q + 128 in (N/16, D/4, 16, 4); and the scales."""
    n, d = weight.shape
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = (torch.round(w / scale[:, None]).clamp(-127, 127) + 128).to(torch.uint8)
    packed = huge_page_empty((n // BLOCK, d // 4, BLOCK, 4), torch.uint8)
    packed.copy_(q.view(n // BLOCK, BLOCK, d // 4, 4).transpose(1, 2))
    return packed, scale.contiguous()


def dequantize_i8(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    nb, dq, _, _ = packed.shape
    q = packed.transpose(1, 2).reshape(nb * BLOCK, dq * 4).float() - 128.0
    return q * scale[:, None]


I4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # int4: ratios of a group's max tried for its scale


def quantize_i4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (-7..7) per output and group of 64 inputs: q (N, D) int8 and scales (N, D/64),
    each group's scale the clipped max (I4_CLIPS) with the least squared error, rounded to a
    bfloat16 value (float32 tensor; 2 bytes per 64 weights where the kernels store it)."""
    n, d = weight.shape
    w = weight.detach().float().view(n, d // GROUP, GROUP)
    top = w.abs().amax(dim=2, keepdim=True).clamp_min(1e-12)  # (N, G, 1)
    best_err, best_scale = None, None
    for clip in I4_CLIPS:
        scale = (top * clip / 7.0).to(torch.bfloat16).float()  # the kernels' scales are bfloat16
        err = ((torch.round(w / scale).clamp(-7, 7) * scale - w) ** 2).sum(dim=2, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    q = torch.round(w / best_scale).clamp(-7, 7).to(torch.int8).view(n, d)
    return q, best_scale.view(n, d // GROUP).contiguous()


def quantize_pack_i4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 as `quantize_i4`, stored as q + 8 two per byte in (N/16, D/64, 8, 16, 4): byte (j, lane, k)
    holds input 4j + k of the group in its low nibble and input 32 + 4j + k in its high one; the
    scales as (N/16, D/64, 16) bfloat16 (exact: `quantize_i4` rounds them so)."""
    n, d = weight.shape
    q, scale = quantize_i4(weight)
    u = (q + 8).to(torch.uint8).view(n // BLOCK, BLOCK, d // GROUP, 16, 4).permute(0, 2, 3, 1, 4)  # (nb, G, quad, 16, 4)
    packed = huge_page_empty((n // BLOCK, d // GROUP, 8, BLOCK, 4), torch.uint8)
    packed.copy_(u[:, :, :8] | (u[:, :, 8:] << 4))
    return packed, scale.view(n // BLOCK, BLOCK, d // GROUP).transpose(1, 2).to(torch.bfloat16).contiguous()


def dequantize_i4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    nb, groups, _, _, _ = packed.shape
    u = torch.cat([packed & 15, packed >> 4], dim=2)  # (nb, G, 16 quads, 16, 4)
    q = u.permute(0, 3, 1, 2, 4).reshape(nb * BLOCK, groups * GROUP).float() - 8.0
    return q * scale.float().transpose(1, 2).reshape(nb * BLOCK, groups).repeat_interleave(GROUP, dim=1)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """(N, D) -> bfloat16 (rounded to nearest even) in (N/16, D/2, 16, 2): two inputs per 32-bit lane."""
    n, d = weight.shape
    packed = huge_page_empty((n // BLOCK, d // 2, BLOCK, 2), torch.bfloat16)
    packed.copy_(weight.detach().to(torch.bfloat16).view(n // BLOCK, BLOCK, d // 2, 2).transpose(1, 2))
    return packed


def unpack_bf16(packed: torch.Tensor) -> torch.Tensor:
    """The (N, D) float32 weight a bfloat16 pack holds (exact: every bfloat16 is a float32)."""
    nb, dp, _, _ = packed.shape
    return packed.transpose(1, 2).reshape(nb * BLOCK, dp * 2).float()


def packable(n: int, d: int, int8: bool = False) -> bool:
    return n % BLOCK == 0 and (d % GROUP == 0 and d <= 65536 if int8 else True)


# ---------------------------------------------------------------- products

def linear_f32(packed: torch.Tensor, x: torch.Tensor, act: int = 0) -> torch.Tensor:
    """x (rows, D) float32 contiguous @ W.T -> (rows, N), then the activation `act` (ACTIVATIONS)."""
    nb, d, _ = packed.shape
    rows = x.shape[0]
    y = torch.empty(rows, nb * BLOCK)
    (_lib or library()).ms_linear_f32(packed.data_ptr(), x.data_ptr(), y.data_ptr(), nb * BLOCK, d, rows, act)
    return y


def linear_i8(packed: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, act: int = 0) -> torch.Tensor:
    nb, dq, _, _ = packed.shape
    rows = x.shape[0]
    y = torch.empty(rows, nb * BLOCK)
    rc = (_lib or library()).ms_linear_i8(packed.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(),
                                          nb * BLOCK, dq * 4, rows, act)
    if rc != 0:
        raise RuntimeError(f"int8 kernel refused the call ({rc}): shape ({nb * BLOCK}, {dq * 4})")
    return y


def linear_i4(packed: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, act: int = 0) -> torch.Tensor:
    assert scale.dtype == torch.bfloat16, "int4 scales are bfloat16 (quantize_pack_i4)"
    nb, groups = packed.shape[:2]
    rows = x.shape[0]
    y = torch.empty(rows, nb * BLOCK)
    rc = (_lib or library()).ms_linear_i4(packed.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(),
                                          nb * BLOCK, groups * GROUP, rows, act)
    if rc != 0:
        raise RuntimeError(f"int4 kernel refused the call ({rc}): shape ({nb * BLOCK}, {groups * GROUP})")
    return y


def linear_bf16(packed: torch.Tensor, x: torch.Tensor, act: int = 0) -> torch.Tensor:
    """x (rows, D) float32 contiguous, rounded to bfloat16, @ W.T -> (rows, N) float32."""
    nb, dp, _, _ = packed.shape
    rows = x.shape[0]
    y = torch.empty(rows, nb * BLOCK)
    rc = (_lib or library()).ms_linear_bf16(packed.data_ptr(), x.data_ptr(), y.data_ptr(), nb * BLOCK, dp * 2, rows, act)
    if rc != 0:
        raise RuntimeError(f"bfloat16 kernel refused the call ({rc}): shape ({nb * BLOCK}, {dp * 2})")
    return y


def kv_store_i8(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, scales: torch.Tensor,
                upto: int | None) -> torch.Tensor | None:
    """Quantize x (B, H, T, hd) float32, last dimension contiguous, into the 8-bit `cache` (B, H, L, hd)
    and its `scales` (B, H, L) at `positions` (T,), as model/kv_cache.quantize_heads does; return the
    cache's first `upto` positions dequantized (B, H, upto, hd) float32, or None for `upto` None."""
    B, H, L, hd = cache.shape
    T = x.shape[2]
    assert x.dtype == torch.float32 and x.shape == (B, H, T, hd) and x.stride(3) == 1
    assert cache.dtype == torch.int8 and cache.is_contiguous() and scales.is_contiguous()
    assert scales.shape == (B, H, L) and scales.dtype == torch.float32
    pos = positions.to(torch.int64).contiguous()
    out = torch.empty(B, H, upto, hd) if upto is not None else None
    rc = (_lib or library()).ms_kv_store_i8(
        x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), pos.data_ptr(), T, cache.data_ptr(), scales.data_ptr(),
        B, H, L, hd, out.data_ptr() if out is not None else None, upto or 0)
    if rc != 0:
        raise RuntimeError(f"8-bit cache store refused positions {pos.tolist()[:4]}.. or {upto} of a cache of {L}")
    return out


def attend(q: torch.Tensor, kv_new: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
           v_cache: torch.Tensor, pos: int, length: int,
           scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One query per row and head against a float32, bfloat16 or int8 cache (B, H, Lmax, hd), reading
    only its first `length` positions; with `kv_new`, the new key and value are written at `pos`
    first (rounded to nearest even for a bfloat16 cache, quantized for an int8 one, whose
    `scales` (B, H, Lmax) for keys and values come with it: see model/kv_cache.QuantizedKVCache).
    q and the new key/value are (B, H * hd) views with a shared row stride (e.g. thirds of one
    fused projection's output). Returns (B, H * hd)."""
    B, H, max_len, hd = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and q.stride(1) == 1
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (torch.float32, torch.bfloat16, torch.int8)
    i8 = k_cache.dtype == torch.int8
    assert (scales is not None) == i8, "an int8 cache needs its scales, and only it has them"
    if i8:
        assert all(s.shape == (B, H, max_len) and s.dtype == torch.float32 and s.is_contiguous() for s in scales)
    out = torch.empty(B, H * hd)
    k_new, v_new = kv_new if kv_new is not None else (None, None)
    rc = (_lib or library()).ms_attend(
        q.data_ptr(), k_new.data_ptr() if k_new is not None else None, v_new.data_ptr() if v_new is not None else None,
        q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), B, H, max_len, hd, pos, length,
        hd ** -0.5, int(k_cache.dtype == torch.bfloat16), scales[0].data_ptr() if i8 else None,
        scales[1].data_ptr() if i8 else None, int(i8))
    if rc != 0:
        raise RuntimeError(f"attention kernel refused position {pos}, length {length} for a cache of {max_len}")
    return out
