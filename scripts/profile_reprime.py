"""Where a window re-prime's slice spends its time on the CPU: one slice of `--positions`
positions (both CFG rows) prefilled into a cache that already holds `--start`, as
live/window.py runs it each step of a re-prime, profiled with cProfile and summed by what the
time went to (the C products, attention, the 8-bit cache's store and dequantization, the rest).

    PYTHONPATH=$PWD python scripts/profile_reprime.py --model small --weights int4 --kv-cache int8 \
        --json bench/results/reprime-slice-cpu-small-int4-kv8.json

The products' rate (multiply-adds per second) says how far the prefill is from the machine:
a slice is compute-bound, so riding on the decoder step's weight read would save little.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch

import musicsteer as ms
from musicsteer.kernels import cpu as cpu_kernels

# cProfile's function names for each share of a slice
PARTS = {"products (C kernels)": ("linear.py", "kernel"),
         "attention (torch SDPA)": ("~", "<built-in method torch._C._nn.scaled_dot_product_attention>"),
         "8-bit cache store and dequantization (C)": ("cpu.py", "kv_store_i8")}


def linear_macs(decoder: torch.nn.Module, rows: int) -> int:
    """Multiply-adds of the packed products a prefill runs for `rows` rows (every block's but the
    prompt's key and value projection, which the prompt's memory holds; no output heads)."""
    return rows * sum(m.in_features * m.out_features for name, m in decoder.named_modules()
                      if hasattr(m, "_bind") and name.startswith("blocks.") and not name.endswith("cross_attn.wkv"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--weights", default="int4")
    p.add_argument("--kv-cache", default="int8")
    p.add_argument("--positions", type=int, default=32, help="positions per slice (bench stream's --reprime-chunk)")
    p.add_argument("--start", type=int, default=200, help="positions already in the spare cache")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    model = ms.load_model(args.model, weights=args.weights, kv_cache=args.kv_cache)
    dec = model.decoder
    K, n, start = dec.cfg.codebooks, args.positions, args.start
    dec.setup_caches(2, max_len=start + n + 8, max_text=8)
    dec.set_condition(torch.randn(2, 8, dec.cfg.text_hidden), torch.ones(2, 8))
    g = torch.Generator().manual_seed(0)
    cols = torch.randint(0, dec.cfg.vocab, (2, K, start + n), generator=g)
    pos = torch.arange(start + n)
    times = []
    with torch.inference_mode():
        dec.hidden_states(cols[..., :start], pos[:start], kv_len=start)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dec.hidden_states(cols[..., start:], pos[start:], kv_len=start + n)
            times.append((time.perf_counter() - t0) * 1e3)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            dec.hidden_states(cols[..., start:], pos[start:], kv_len=start + n)
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values()) / args.repeats * 1e3
    parts = {}
    for part, (file, name) in PARTS.items():
        parts[part] = sum(v[2] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == name) / args.repeats * 1e3
    parts["the rest (layer norms, Python, torch glue)"] = total - sum(parts.values())
    macs = linear_macs(dec, 2 * n)
    record = {"benchmark": "reprime-slice", "model": args.model, "weights": args.weights, "kv_cache": args.kv_cache,
              "positions": n, "rows": 2 * n, "start": start, "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_at_end": os.getloadavg()[0],
              "tiles": cpu_kernels.use_tiles(), "kernels": cpu_kernels.paths(),
              "slice_ms": {"min": min(times), "median": sorted(times)[len(times) // 2]},
              "profiled_ms_per_slice": total, "parts_ms_per_slice": parts,
              "products_gmac": macs / 1e9,
              "products_gmac_per_s": macs / 1e9 / (parts["products (C kernels)"] / 1e3)}
    print(f"{args.model} {args.weights}, {args.kv_cache} cache, a slice of {n} positions ({2 * n} rows) after {start}, "
          f"{record['threads']} threads: {record['slice_ms']['median']:.1f} ms (min {record['slice_ms']['min']:.1f})")
    for part, ms_ in parts.items():
        print(f"  {part:45s} {ms_:7.1f} ms")
    print(f"  products: {record['products_gmac']:.1f} G multiply-adds at {record['products_gmac_per_s']:.0f} G/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
