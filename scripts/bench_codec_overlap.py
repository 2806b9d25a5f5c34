"""The codec beside the decoder step, or after it: one live stream (null sink, as fast as it goes)
whose steps take the two in turns, twenty steps each (the two steps after each switch and the
re-prime's steps left out), so that both see the same host, positions and window cycles.
`StreamingCodecSettings.overlap` (live --codec-overlap, the default) runs each frame's native
codec decode on thread 0 of the next fused CPU step (kernels/cpu_block.c ms_blocks_side).

    PYTHONPATH=$PWD python scripts/bench_codec_overlap.py --model small --weights int4 --kv-cache int8 \
        --concepts 8 --json bench/results/codec-overlap-cpu-small-int4-kv8.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from musicsteer.bench.latency import git_commit, machine_info
from musicsteer.bench.stream import random_pack
from musicsteer.codec.stream import StreamingCodecSettings
from musicsteer.live.producer import StepObserver
from musicsteer.live.session import LiveRequest, start_session
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

TURN = 20  # steps per mode before the other takes over


class Turns(StepObserver):
    """Switches the producer between the two modes every TURN steps and keeps each step's split."""

    def __init__(self) -> None:
        self.producer = None
        self.rows: list[tuple[int, int, float, float, float, float, int]] = []

    def step_started(self, step: int) -> None:
        if step % TURN == 0 and self.producer is not None:
            self.producer._overlap = (step // TURN) % 2 == 1  # taken at a step boundary (producer.py)

    def step_timed(self, step: int, split) -> None:
        self.rows.append((step, int(self.producer._overlap), split.total, split.decode, split.codec,
                          split.codec_hidden, split.reprime_positions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--weights", default="int4", choices=("full", "bf16", "int8", "int4"))
    parser.add_argument("--kv-cache", default="int8", choices=("auto", "float32", "bf16", "int8"))
    parser.add_argument("--codec-precision", default="int8", choices=("float32", "int8"))
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--keep", type=float, default=5.0)
    parser.add_argument("--concepts", type=int, default=0, help="steer this many concepts of a random pack")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = load_model(args.model, weights=args.weights, kv_cache=args.kv_cache)
    turns = Turns()
    with tempfile.TemporaryDirectory(prefix="musicsteer-overlap-") as tmp:
        names = random_pack(model, args.concepts, Path(tmp)) if args.concepts else []
        request = LiveRequest("benchmark stream", SamplingSettings(seed=0), null="fast", seconds=args.seconds,
                              window_s=args.window, keep_s=args.keep, status=False,
                              concepts=Path(tmp) if names else None, steer={n: 1.0 for n in names},
                              codec=StreamingCodecSettings(precision=args.codec_precision))
        parts = start_session(model, request, observers=[turns], on_start=lambda p: setattr(turns, "producer", p))
        while parts.producer.running:
            time.sleep(0.05)
        result = parts.finish(drain=True)
    if result.stats.error:
        raise SystemExit(f"bench_codec_overlap: the stream stopped: {result.stats.error}")
    if not parts.producer._overlap and not any(r[5] > 0 for r in turns.rows):
        raise SystemExit("bench_codec_overlap: this model and build cannot run the codec beside the step")
    rows = np.array(turns.rows)
    kept = (rows[:, 0] % TURN >= 2) & (rows[:, 6] == 0) & (rows[:, 0] >= 2 * TURN)
    modes = {}
    for name, on in (("after", 0), ("beside", 1)):
        r = rows[kept & (rows[:, 1] == on)]
        modes[name] = {"steps": int(len(r)), "step_ms_mean": float(r[:, 2].mean() * 1e3),
                       "step_ms_p50": float(np.median(r[:, 2]) * 1e3), "decode_ms_mean": float(r[:, 3].mean() * 1e3),
                       "codec_ms_mean": float(r[:, 4].mean() * 1e3),
                       "codec_inside_decode_ms_mean": float(r[:, 5].mean() * 1e3)}
        m = modes[name]
        print(f"codec {name:6s} the step: {m['step_ms_mean']:6.2f} ms per step (p50 {m['step_ms_p50']:.2f}; decoder "
              f"{m['decode_ms_mean']:.2f}, codec left on the producer {m['codec_ms_mean']:.2f}, inside the decoder "
              f"{m['codec_inside_decode_ms_mean']:.2f}; {m['steps']} steps)")
    saved = modes["after"]["step_ms_mean"] - modes["beside"]["step_ms_mean"]
    print(f"beside the step saves {saved:.2f} ms per step")
    if args.json:
        record = {"benchmark": "codec_overlap", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "machine": machine_info(model.decoder.embed.weight.device), "model": args.model,
                  "weights": args.weights, "kv_cache": args.kv_cache, "codec": args.codec_precision,
                  "seconds": args.seconds, "window_s": args.window, "keep_s": args.keep, "concepts": args.concepts,
                  "turn_steps": TURN, "modes": modes, "saved_ms_per_step": saved,
                  "what": "steps outside the re-prime, the two after each switch left out; step = the producer's "
                          "whole step (decoder, codec, the rest), ring waits excluded"}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
