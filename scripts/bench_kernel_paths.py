"""Time each CPU kernel family of two builds of the kernel library in one process, in turns.

    MUSICSTEER_CPU_MARCH is ignored: the script builds `native` and `x86-64-v3` itself (both
    cached like the library the decoder loads) and loads both .so files side by side, then
    alternates them call by call so that both see the same load on a shared host. One thread
    (OMP_NUM_THREADS=1 is set before torch starts its team), two rows (a CFG pair), weights of
    0.14-1 MiB and caches of 1.6 MiB so that they sit in L2: this measures the kernels' arithmetic, not memory.

    PYTHONPATH=$PWD python scripts/bench_kernel_paths.py --json bench/results/kernels-native-vs-x86-64-v3.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

from musicsteer.kernels import cpu  # noqa: E402

MARCHES = ("native", "x86-64-v3")


def load(march: str) -> ctypes.CDLL:
    cpu.FLAGS[1] = f"-march={march}"  # the flags are part of the cache key
    lib = ctypes.CDLL(str(cpu._build()))
    lib.ms_paths.restype = ctypes.c_char_p
    for name in ("ms_linear_f32", "ms_linear_bf16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4
    for name in ("ms_linear_i8", "ms_linear_i4"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.ms_attend.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6 + [
        ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def cases(n: int, d: int, rows: int):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, d, generator=g) / d ** 0.5, torch.randn(rows, d, generator=g)
    y = torch.empty(rows, n)
    f32, bf16 = cpu.pack_f32(w), cpu.pack_bf16(w)
    (i8, s8), (i4, s4) = cpu.quantize_pack_i8(w), cpu.quantize_pack_i4(w)
    B, H, hd, length = rows, 16, 64, 100
    kc = {dt: torch.randn(B, H, length, hd, generator=g).to(dt) for dt in (torch.float32, torch.bfloat16)}
    kc[torch.int8] = torch.randint(-127, 128, (B, H, length, hd), generator=g, dtype=torch.int8)
    scales = torch.rand(B, H, length, generator=g) / 127
    q, out = torch.randn(B, H * hd, generator=g), torch.empty(B, H * hd)
    keep = [w, x, y, f32, bf16, i8, s8, i4, s4, kc, scales, q, out]  # alive while the calls run
    p = lambda t: t.data_ptr()  # noqa: E731
    return keep, {
        "f32": (n * d, lambda lib: lib.ms_linear_f32(p(f32), p(x), p(y), n, d, rows, 0)),
        "bf16": (n * d, lambda lib: lib.ms_linear_bf16(p(bf16), p(x), p(y), n, d, rows, 0)),
        "i8": (n * d, lambda lib: lib.ms_linear_i8(p(i8), p(s8), p(x), p(y), n, d, rows, 0)),
        "i4": (n * d, lambda lib: lib.ms_linear_i4(p(i4), p(s4), p(x), p(y), n, d, rows, 0)),
        "attend_f32": (B * H * length * hd * 2, lambda lib: lib.ms_attend(
            p(q), None, None, H * hd, p(kc[torch.float32]), p(kc[torch.float32]), p(out), B, H, length, hd, -1, length,
            hd ** -0.5, 0, None, None, 0)),
        "attend_bf16": (B * H * length * hd * 2, lambda lib: lib.ms_attend(
            p(q), None, None, H * hd, p(kc[torch.bfloat16]), p(kc[torch.bfloat16]), p(out), B, H, length, hd, -1,
            length, hd ** -0.5, 1, None, None, 0)),
        "attend_i8": (B * H * length * hd * 2, lambda lib: lib.ms_attend(
            p(q), None, None, H * hd, p(kc[torch.int8]), p(kc[torch.int8]), p(out), B, H, length, hd, -1,
            length, hd ** -0.5, 0, p(scales), p(scales), 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    parser.add_argument("--json")
    args = parser.parse_args()
    libs = {m: load(m) for m in MARCHES}
    load_average = os.getloadavg()[0]
    keep, families = cases(args.n, args.d, args.rows)
    times: dict[str, dict[str, list[float]]] = {f: {m: [] for m in MARCHES} for f in families}
    for round_ in range(args.rounds):
        for family, (_, call) in families.items():
            for march in MARCHES[::1 - 2 * (round_ % 2)]:  # each build first in every other round
                call(libs[march])  # its data back in cache
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call(libs[march])
                times[family][march].append((time.perf_counter() - t0) / args.calls)
    record = {"benchmark": "kernel-paths", "shape": {"n": args.n, "d": args.d, "rows": args.rows}, "threads": 1,
              "load_average_at_start": load_average, "paths": {m: libs[m].ms_paths().decode() for m in MARCHES},
              "families": {}}
    # the fastest round: on a shared host most rounds lose part of their time slice to other work
    print(f"one thread, {args.rows} rows, W {args.n}x{args.d}; best and median of {args.rounds} rounds in turns")
    for family, (work, _) in families.items():
        best = {m: min(times[family][m]) for m in MARCHES}
        med = {m: statistics.median(times[family][m]) for m in MARCHES}
        record["families"][family] = {m: {"best_us": best[m] * 1e6, "median_us": med[m] * 1e6,
                                          "g_per_s": work / best[m] / 1e9} for m in MARCHES}
        record["families"][family]["v3_over_native"] = best["x86-64-v3"] / best["native"]
        print(f"{family:12s} native {best['native'] * 1e6:8.1f} us (median {med['native'] * 1e6:8.1f})  x86-64-v3 "
              f"{best['x86-64-v3'] * 1e6:8.1f} us (median {med['x86-64-v3'] * 1e6:8.1f})  "
              f"{best['x86-64-v3'] / best['native']:.2f}x the time")
    del keep
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
