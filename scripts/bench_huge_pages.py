"""The CPU step's weights on 2 MiB pages (backends/cpu/arena.py, the default) or on 4 KiB pages: one
long generation whose decoder steps take the two in turns, ten steps each (the step after each switch
left out). The 4 KiB copy is a clone of every tensor the step reads, made after loading; the modules
are pointed at one copy or the other between steps.

    PYTHONPATH=$PWD python scripts/bench_huge_pages.py --model small --weights int4 --kv-cache int8 \
        --json bench/results/huge-pages-cpu-small-int4-kv8.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from torch import nn

from musicsteer.backends.cpu import arena
from musicsteer.backends.cpu.linear import PackedBase
from musicsteer.bench.latency import git_commit, machine_info
from musicsteer.model.generate import generate
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

TURN = 10  # steps per placement before the other takes over


def huge_kb() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--weights", default="int4", choices=("full", "bf16", "int8", "int4"))
    parser.add_argument("--kv-cache", default="int8", choices=("auto", "float32", "bf16", "int8"))
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not arena.enabled():
        raise SystemExit("bench_huge_pages: MUSICSTEER_CPU_HUGE_PAGES=0 or not Linux: no arena to compare")
    model = load_model(args.model, weights=args.weights, kv_cache=args.kv_cache)
    decoder = model.decoder
    items = [(m, *entry) for m in arena.step_modules(decoder) for entry in arena._tensors(m)]
    placements = {"2 MiB pages": [t for *_, t in items], "4 KiB pages": [t.clone() for *_, t in items]}
    names = list(placements)

    def use(tensors) -> None:
        for (_, table, name, _), new in zip(items, tensors):
            if isinstance(table[name], nn.Parameter):
                table[name].data = new
            else:
                table[name] = new
        for module in arena.step_modules(decoder):
            if isinstance(module, PackedBase):
                module._bind()

    steps: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        starts: list[float] = []
        ends: list[float] = []

        def before(s: int) -> None:
            if s % TURN == 0:
                use(placements[names[s // TURN % 2]])
            starts.append(time.perf_counter())

        generate(decoder, model.text, "benchmark prompt", args.frames, SamplingSettings(), before_step=before,
                 on_step=lambda s: ends.append(time.perf_counter()))
        times = np.array(ends) - np.array(starts)
        for s in range(2 * TURN, len(times)):
            if s % TURN:
                steps[names[s // TURN % 2]].append(float(times[s]))
    use(placements[names[0]])
    p50 = {n: float(np.median(t)) * 1e3 for n, t in steps.items()}
    for n in names:
        print(f"weights on {n}: p50 {p50[n]:6.2f} ms per step, mean {np.mean(steps[n]) * 1e3:6.2f} ({len(steps[n])} steps)")
    if args.json:
        record = {"benchmark": "huge_pages", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": machine_info(decoder.embed.weight.device), "model": args.model, "weights": args.weights,
                  "kv_cache": args.kv_cache, "frames": args.frames, "rounds": args.rounds,
                  "arena_bytes": sum(t.numel() * t.element_size() for t in placements[names[0]]),
                  "anon_huge_pages_kb": huge_kb(), "p50_ms": p50,
                  "mean_ms": {n: float(np.mean(t)) * 1e3 for n, t in steps.items()}}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
