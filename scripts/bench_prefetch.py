"""Which software-prefetch distance suits this CPU: one long generation whose decoder steps take
the distances in turns, ten steps each (the step after each switch left out), so that every
distance sees the same host and the same window positions. kernels/cpu.py's default is 8 KiB
ahead on Intel CPUs and none elsewhere; `MUSICSTEER_CPU_PREFETCH=BYTES` sets another.

    PYTHONPATH=$PWD python scripts/bench_prefetch.py --model small --weights int4 --kv-cache int8 \
        --json bench/results/prefetch-cpu-small-int4-kv8.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from musicsteer.bench.latency import git_commit, machine_info
from musicsteer.kernels import cpu as cpu_kernels
from musicsteer.model.generate import generate
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

TURN = 10  # steps per distance before the next takes over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--weights", default="int4", choices=("full", "bf16", "int8", "int4"))
    parser.add_argument("--kv-cache", default="int8", choices=("auto", "float32", "bf16", "int8"))
    parser.add_argument("--distances", default="0,2048,4096,8192,12288,16384", help="bytes ahead, comma-separated")
    parser.add_argument("--frames", type=int, default=600, help="frames per generation (its positions)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    distances = [int(d) for d in args.distances.split(",")]
    if cpu_kernels.library() is None:
        raise SystemExit(f"bench_prefetch: no CPU kernels: {cpu_kernels.unavailable()}")
    model = load_model(args.model, weights=args.weights, kv_cache=args.kv_cache)
    default = cpu_kernels.prefetch()
    steps: dict[int, list[float]] = {d: [] for d in distances}
    for _ in range(args.rounds):
        starts: list[float] = []
        ends: list[float] = []

        def before(s: int) -> None:
            if s % TURN == 0:
                cpu_kernels.prefetch(distances[s // TURN % len(distances)])
            starts.append(time.perf_counter())

        generate(model.decoder, model.text, "benchmark prompt", args.frames, SamplingSettings(),
                 before_step=before, on_step=lambda s: ends.append(time.perf_counter()))
        times = np.array(ends) - np.array(starts)
        for s in range(2 * TURN, len(times)):
            if s % TURN:
                steps[distances[s // TURN % len(distances)]].append(float(times[s]))
    cpu_kernels.prefetch(default)
    p50 = {d: float(np.median(t)) * 1e3 for d, t in steps.items()}
    for d in distances:
        print(f"prefetch {d:6d} bytes ahead: p50 {p50[d]:6.2f} ms per step ({len(steps[d])} steps)")
    best = min(p50, key=p50.get)
    print(f"fastest: {best} bytes ahead; this CPU's default is {default}")
    if args.json:
        record = {"benchmark": "prefetch", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": machine_info(model.decoder.embed.weight.device), "model": args.model,
                  "weights": args.weights, "kv_cache": args.kv_cache, "frames": args.frames, "rounds": args.rounds,
                  "default_bytes": default, "p50_ms": {str(d): v for d, v in p50.items()}, "fastest_bytes": best,
                  "steps_ms": {str(d): [round(v * 1e3, 3) for v in t] for d, t in steps.items()}}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
