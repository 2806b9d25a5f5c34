"""`musicsteer bench latency`: per-token time of the real generation loop, with and
without steering concepts, against the 20 ms frame budget.

Timing wraps `model.generate` itself (the loop render and the stream run): a step
is the time between two `on_step` calls, so it includes the steering plan's buffer
write, the decoder, guidance and sampling. On CUDA each step is synchronised before
its stamp. Warm-up steps are dropped.

The bandwidth floor on CPU is set against the step three ways: the best streaming read of
the whole run (the strictest, and on a shared host a burst the step rarely sees), the
best read beside each round (`--rounds`), and step by step, each unsteered step after a
streaming read of exactly the bytes it reads (what the memory delivered at that moment).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..kernels import cpu as cpu_kernels
from ..kernels import steer
from ..model.generate import generate, prepare
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings, make_generator
from ..model.step import DecodeStep
from ..steering.pack import ConceptPack
from ..steering.plan import SteeringSettings, build_steering

FRAME_MS = 20.0


@dataclass
class StepStats:
    concepts: int
    steps: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    tokens_per_s: float
    realtime_factor: float  # audio seconds generated per second of compute (>1 is faster than real time)

    @classmethod
    def of(cls, concepts: int, seconds: np.ndarray) -> "StepStats":
        ms = seconds * 1e3
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        mean = float(ms.mean())
        return cls(concepts, len(ms), float(p50), float(p95), float(p99), float(ms.max()), mean,
                   1e3 / mean, FRAME_MS / mean)


def time_generation(model: LoadedModel, steps: int, warmup: int, concepts: int,
                    sampling: SamplingSettings, steering: SteeringSettings = SteeringSettings(),
                    prompt: str = "benchmark prompt", graph: bool = False, prompts: int = 1) -> np.ndarray:
    """Seconds per step for `steps` timed steps after `warmup`, with `concepts` random concepts active
    and `prompts` prompts blended at equal weights."""
    decoder = model.decoder
    device = decoder.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stamps: list[float] = []

    def on_step(_):
        sync()
        stamps.append(time.perf_counter())

    frames = max(warmup + steps - (decoder.cfg.codebooks - 1), 1)  # generate runs frames + K - 1 steps
    steerer = plan = None
    if concepts:
        names = [f"c{k}" for k in range(concepts)]
        pack = ConceptPack.random(names, decoder.cfg, model.model_id, seed=concepts)
        steerer, plan = build_steering(decoder, pack, steering, sampling.batch)
        for n in names:
            plan.set_strength(n, 0.1)
        steerer.attach()
    try:
        sync()
        stamps.append(time.perf_counter())
        generate(decoder, model.text, prompt, frames, sampling, on_step=on_step,
                 before_step=(lambda s: plan.write(s, steerer)) if plan is not None else None, graph=graph,
                 blend=tuple(f"{prompt}, variation {i}" for i in range(1, prompts)))
    finally:
        if steerer is not None:
            steerer.detach()
    return np.diff(np.array(stamps))[warmup : warmup + steps]


def time_interleaved(model: LoadedModel, steps: int, warmup: int, nbytes: int, sampling: SamplingSettings,
                     prompt: str = "benchmark prompt") -> tuple[np.ndarray, np.ndarray]:
    """Seconds per unsteered step and per streaming read of `nbytes` taken just before it, for
    `steps` steps after `warmup`: on a shared host whose bandwidth moves from one second to the
    next, each step is set against what the memory delivered at that moment, on the same scale
    of bytes and time (a best-of-five read of 512 MiB catches the host's bursts instead)."""
    from ..kernels.cpu import huge_page_empty

    decoder = model.decoder
    buffer = huge_page_empty((nbytes // 4,), torch.float32)
    buffer.fill_(1.0)
    buffer.max()
    reads: list[float] = []
    starts: list[float] = []
    ends: list[float] = []

    def before(s: int) -> None:
        if s >= warmup:
            t = time.perf_counter()
            buffer.max()
            reads.append(time.perf_counter() - t)
        starts.append(time.perf_counter())

    def after(s: int) -> None:
        ends.append(time.perf_counter())

    frames = max(warmup + steps - (decoder.cfg.codebooks - 1), 1)
    generate(decoder, model.text, prompt, frames, sampling, before_step=before, on_step=after)
    step = (np.array(ends) - np.array(starts))[warmup : warmup + steps]
    return step, np.array(reads[: len(step)])


def time_steering_only(model: LoadedModel, concepts: int, batch: int, steering: SteeringSettings,
                       iters: int = 200) -> np.ndarray:
    """Seconds per step of the steering work alone: the plan's buffer write and one kernel call
    per hooked layer on a (batch, 1, hidden) state. Isolated from the decoder's noise."""
    decoder = model.decoder
    device, dtype = decoder.embed.weight.device, decoder.embed.weight.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = [f"c{k}" for k in range(concepts)]
    pack = ConceptPack.random(names, decoder.cfg, model.model_id, seed=concepts)
    steerer, plan = build_steering(decoder, pack, steering, batch)
    for n in names:
        plan.set_strength(n, 0.1)
    h = torch.randn(batch, 1, decoder.cfg.hidden, device=device, dtype=dtype)
    times = []
    for s in range(iters + 10):
        sync()
        t0 = time.perf_counter()
        plan.write(s, steerer)
        for i in steerer.layers:
            h = steer(h, steerer.alpha[i], steerer.directions[i], steerer.targets[i], steerer.mode.kernel)
        sync()
        times.append(time.perf_counter() - t0)
    return np.array(times[10:])


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if device.type == "cpu":
        info["cpu_march"], info["cpu_kernels"] = cpu_kernels.MARCH, cpu_kernels.paths()
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_latency(model: LoadedModel, steps: int, warmup: int, concept_counts: list[int],
                sampling: SamplingSettings, steering: SteeringSettings, dtype: str,
                baselines: list[str] = (), floor: bool = True, graph: bool = False, weights: str = "full",
                rounds: int = 1, prompts: int = 1) -> dict:
    """Time `steps` steps per concept count. With `rounds` > 1 the counts take turns, `steps / rounds`
    at a time, and the streaming bandwidth is sampled between rounds: on a shared host whose speed
    drifts over minutes, every configuration then sees the same conditions, and each round's p50
    can be set against the floor measured beside it. `prompts` > 1 blends that many prompts at
    equal weights in every timed step (the morph's cost)."""
    from .baselines import (
        audiocraft_step_ms,
        peer_precision,
        step_cache_bytes,
        step_weight_bytes,
        stream_bandwidth,
        transformers_step_ms,
    )

    device = model.decoder.embed.weight.device
    measure_floor = floor and device.type == "cpu"
    rounds = max(1, min(rounds, steps))
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    bandwidths = [stream_bandwidth()] if measure_floor else []
    parts: dict[int, list[np.ndarray]] = {k: [] for k in concept_counts}
    for n in per_round:
        for k in concept_counts:
            parts[k].append(time_generation(model, n, warmup, k, sampling, steering, graph=graph, prompts=prompts))
        if measure_floor:  # the host's bandwidth drifts: sample it after every round, keep the best
            bandwidths.append(stream_bandwidth())
    samples = {k: np.concatenate(p) for k, p in parts.items()}
    results = [StepStats.of(k, t) for k, t in samples.items()]
    base = next((r for r in results if r.concepts == 0), None)
    record = {
        "benchmark": "latency", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device), "model": model.model_id, "shape": asdict(model.cfg), "dtype": dtype,
        "weights": weights, "cache_dtype": str(model.decoder.cache_dtype or model.decoder.embed.weight.dtype),
        "cfg": sampling.cfg, "steering_mode": steering.mode, "warmup": warmup, "cuda_graph": graph, "rounds": rounds,
        "prompts": prompts,
        "results": [asdict(r) for r in results],
        "step_times_ms": {str(k): (t * 1e3).round(3).tolist() for k, t in samples.items()},
    }
    first = results[0]
    if measure_floor:
        nbytes, bw = step_weight_bytes(model), max(bandwidths)
        position = warmup + (per_round[0] - 1) / 2  # the timed steps' middle position
        cache = step_cache_bytes(model, position, sampling.batch)
        floor_ms = (nbytes + cache) / bw * 1e3
        record["floor"] = {"weight_bytes_per_step": nbytes, "cache_bytes_per_step": cache,
                           "cache_position": position, "stream_read_gb_s": bw / 1e9, "floor_ms": floor_ms,
                           "p50_over_floor": first.p50_ms / floor_ms,
                           "stream_read_samples_gb_s": [b / 1e9 for b in bandwidths]}
        if rounds > 1:  # each round's p50 against the floor at the better of the bandwidths beside it
            paired = [float(np.median(t)) * 1e3 / ((nbytes + cache) / max(bandwidths[r], bandwidths[r + 1]) * 1e3)
                      for r, t in enumerate(parts[first.concepts])]
            record["floor"]["p50_over_floor_by_round"] = paired
            record["floor"]["p50_over_floor_paired"] = float(np.median(paired))
        step, read = time_interleaved(model, max(steps // rounds, 10), warmup, int(nbytes + cache), sampling)
        ratio = step / read
        record["floor"]["interleaved"] = {
            "pairs": len(step), "step_ms_p50": float(np.median(step)) * 1e3,
            "read_ms_p50": float(np.median(read)) * 1e3, "read_gb_s_p50": (nbytes + cache) / float(np.median(read)) / 1e9,
            "step_over_read_p50": float(np.median(ratio)), "step_over_read_p90": float(np.percentile(ratio, 90))}
    record["baselines"] = {}
    for name in baselines:
        if name == "transformers":
            precision = peer_precision(weights, dtype)
            ms, what = transformers_step_ms(model, precision, sampling.cfg), f"transformers generate, {precision}"
        else:
            ms, what = audiocraft_step_ms(model, sampling.cfg)
        record["baselines"][name] = {"step_ms": ms, "what": what,
                                     "speedup": (ms / first.p50_ms) if ms is not None else None}
    if base is not None:
        record["steering_overhead_pct"] = {
            str(r.concepts): 100.0 * (r.p50_ms - base.p50_ms) / base.p50_ms for r in results if r.concepts}
        record["steering_only"] = {}
        for k in (k for k in concept_counts if k):
            us = float(np.median(time_steering_only(model, k, sampling.batch, steering)) * 1e6)
            record["steering_only"][str(k)] = {"p50_us": us, "pct_of_step": 100.0 * us / 1e3 / base.p50_ms}
    return record


def run_prompt_costs(model: LoadedModel, steps: int, warmup: int, counts: list[int], sampling: SamplingSettings,
                     dtype: str, weights: str = "full", graph: bool = False,
                     prompt: str = "benchmark prompt") -> dict:
    """Unsteered steps blending each number of prompts in `counts` at equal weights, the counts
    taking turns step by step in one stream (the weights change per step, as a morph fader's do),
    so that every count sees the same host and the same cache positions; p50s and the overhead
    against the first count."""
    decoder = model.decoder
    device = decoder.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    most = max(counts)
    total = warmup + steps * len(counts)
    if total + 1 > decoder.cfg.max_positions:
        raise ValueError(f"{total} steps exceed the model's {decoder.cfg.max_positions} positions")
    prepare(decoder, model.text, prompt, sampling, max_len=total + 1,
            blend=tuple(f"{prompt}, variation {i}" for i in range(1, most)))
    step = DecodeStep(decoder, sampling.batch)
    if graph:
        step.capture([decoder.caches])
    generator = make_generator(sampling.seed, device)
    column = torch.full((decoder.cfg.codebooks,), decoder.cfg.special_token, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {n: [] for n in counts}
    with torch.inference_mode():
        for s in range(total):
            n = counts[s % len(counts)]
            decoder.set_prompt_weights([1.0] * n + [0.0] * (most - n))
            sync()
            t0 = time.perf_counter()
            column, _ = step(column, s, sampling, generator, step.opening(s))
            sync()
            if s >= warmup:
                times[n].append(time.perf_counter() - t0)
    samples = {n: np.array(t) * 1e3 for n, t in times.items()}
    results = {str(n): {"steps": len(ms), "p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
                        "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())} for n, ms in samples.items()}
    base = results[str(counts[0])]["p50_ms"]
    return {
        "benchmark": "latency-prompts", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device), "model": model.model_id, "dtype": dtype, "weights": weights,
        "cfg": sampling.cfg, "warmup": warmup, "interleaved": "per step", "cuda_graph": graph, "results": results,
        "p50_over_first_pct": {k: 100.0 * (r["p50_ms"] - base) / base for k, r in results.items()},
        "step_times_ms": {k: v.round(3).tolist() for k, v in samples.items()},
    }


def format_prompt_costs(record: dict) -> str:
    lines = [f"bench latency: {record['model']} ({record['weights']} weights, {record['machine']['device']}) with "
             f"prompts blended at equal weights, the counts taking turns step by step",
             f"{'prompts':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50 vs first':>13}"]
    for k, r in record["results"].items():
        lines.append(f"{k:>8} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f} "
                     f"{record['p50_over_first_pct'][k]:+12.1f}%")
    return "\n".join(lines)


def format_report(record: dict) -> str:
    graphed = ", CUDA graph" if record.get("cuda_graph") else ""
    if record.get("weights", "full") != "full":
        graphed = f", {record['weights']} weights, {record.get('cache_dtype', '?').replace('torch.', '')} cache" + graphed
    if record.get("prompts", 1) > 1:
        graphed += f", {record['prompts']} prompts blended"
    lines = [f"bench latency: {record['model']} ({record['dtype']}, {record['machine']['device']}{graphed}, "
             f"CFG {record['cfg']}) on {record['machine'].get('gpu', record['machine']['cpu'])}",
             f"{'concepts':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'tok/s':>7} {'RTF':>6}"]
    for r in record["results"]:
        lines.append(f"{r['concepts']:>8} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['p99_ms']:8.2f} "
                     f"{r['max_ms']:8.2f} {r['tokens_per_s']:7.1f} {r['realtime_factor']:6.2f}")
    for k, pct in record.get("steering_overhead_pct", {}).items():
        alone = record["steering_only"][k]
        lines.append(f"steering with {k:>2} concepts: {alone['p50_us']:8.1f} us per step measured alone "
                     f"({alone['pct_of_step']:.2f}% of the unsteered p50); end to end {pct:+.2f}% (run-to-run noise "
                     f"included)")
    if "floor" in record:
        f = record["floor"]
        lines.append(f"bandwidth floor: {f['weight_bytes_per_step'] / 1e9:.2f} GB of weights + "
                     f"{f.get('cache_bytes_per_step', 0) / 1e9:.3f} GB of KV cache (position "
                     f"{f.get('cache_position', 0):.0f}) per step at {f['stream_read_gb_s']:.1f} GB/s = "
                     f"{f['floor_ms']:.1f} ms; p50 is {f['p50_over_floor']:.2f}x")
        if "p50_over_floor_paired" in f:
            lines.append(f"  by round, against the bandwidth measured beside it: "
                         f"{', '.join(f'{x:.2f}x' for x in f['p50_over_floor_by_round'])} "
                         f"(median {f['p50_over_floor_paired']:.2f}x)")
        if "interleaved" in f:
            i = f["interleaved"]
            lines.append(f"  step by step, each after a streaming read of the same bytes ({i['pairs']} pairs): "
                         f"step / read p50 {i['step_over_read_p50']:.2f}x, p90 {i['step_over_read_p90']:.2f}x "
                         f"(reads at {i['read_gb_s_p50']:.1f} GB/s, steps {i['step_ms_p50']:.1f} ms)")
    for name, b in record.get("baselines", {}).items():
        if b["step_ms"] is None:
            lines.append(f"baseline {name}: not run ({b['what']})")
        else:
            lines.append(f"baseline {name}: {b['step_ms']:.1f} ms per step ({b['what']}); "
                         f"musicsteer is {b['speedup']:.2f}x faster")
    lines.append(f"frame budget: {FRAME_MS:.0f} ms per step (RTF >= 1 keeps up with real time)")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """Histogram and timeline of step times, one colour per concept count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, line) = plt.subplots(1, 2, figsize=(11, 4))
    for k, times in record["step_times_ms"].items():
        label = f"{k} concepts"
        hist.hist(times, bins=40, alpha=0.5, label=label)
        line.plot(times, label=label, linewidth=0.8)
    for ax in (hist, line):
        ax.axvline(FRAME_MS, color="red", linestyle="--") if ax is hist else ax.axhline(FRAME_MS, color="red",
                                                                                         linestyle="--")
    hist.set_xlabel("step time (ms)")
    hist.set_ylabel("steps")
    line.set_xlabel("step")
    line.set_ylabel("ms")
    hist.legend()
    fig.suptitle(f"{record['model']} ({record['dtype']}) on {record['machine'].get('gpu', record['machine']['cpu'])};"
                 f" red: the 20 ms frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
