"""`musicsteer bench latency | stream | control | prompts | codec | fidelity`: parses, delegates to
the bench package, prints the report and writes the JSON record. `latency` and `codec` need only
the core packages (`--plot` adds matplotlib); `stream`, `control` and `prompts` run the live stream."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..steering import modes as steering_modes  # the mode registry; imports no torch
from .common import add_model_args, load_from_args
from .extras import STREAM, require


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    lat = bsub.add_parser("latency", help="per-token time of the generation loop, with and without steering")
    add_model_args(lat)
    lat.add_argument("--steps", type=int, default=100, help="timed steps per configuration")
    lat.add_argument("--warmup", type=int, default=10)
    lat.add_argument("--concepts", default="0,1,4,16", metavar="K[,K...]",
                     help="numbers of active steering concepts to time (0 = unsteered)")
    lat.add_argument("--cfg", type=float, default=3.0)
    lat.add_argument("--steer-mode", default="add", choices=steering_modes.names(),
                     help=steering_modes.describe())
    lat.add_argument("--json", type=Path, metavar="FILE", help="write the record as JSON")
    lat.add_argument("--plot", type=Path, metavar="FILE.png", help="histogram and timeline of step times")
    lat.add_argument("--baseline", action="append", default=[], choices=("transformers", "audiocraft"),
                     help="also time a reference implementation on the same shape (repeatable); transformers runs "
                          "at the run's precision: float32, bfloat16 for bf16 weights, torch's dynamic int8 "
                          "for int8 and int4")
    lat.add_argument("--no-floor", action="store_true", help="skip measuring the memory-bandwidth floor")
    lat.add_argument("--rounds", type=int, default=1,
                     help="take turns between the concept counts in this many rounds, sampling the bandwidth "
                          "between them (for noisy shared hosts)")
    lat.add_argument("--prompts", default="1", metavar="N[,N...]",
                     help="blend N prompts at equal weights in every step (the cost of a prompt morph); several "
                          "counts (1,2,4) take turns step by step and are compared (unsteered)")
    lat.add_argument("--cuda-graph", action="store_true",
                     help="replay each step as one captured CUDA graph (needs --compute cuda)")
    lat.set_defaults(run=run_latency)

    stream = bsub.add_parser("stream", help="a long live stream: gaps, re-primes, memory over time")
    add_model_args(stream)
    stream.add_argument("--seconds", type=float, default=150.0)
    stream.add_argument("--fast", action="store_true", help="as fast as possible instead of real-time paced")
    stream.add_argument("--window", type=float, help="seconds of context (default as live: 30 on a GPU, 15 on the CPU)")
    stream.add_argument("--keep", type=float, help="seconds kept at a re-prime (default as live: 10 on a GPU, 5 on the CPU)")
    stream.add_argument("--codec-precision", choices=("float32", "int8"), default="float32",
                        help="the stateful codec's large weights, as live takes them")
    stream.add_argument("--codec-threads", type=int, default=1, metavar="N", help="the stateful codec plan's threads (default 1, which holds up on a busy host; 0: every core): more read its weights faster on a quiet one")
    stream.add_argument("--codec-overlap", action=argparse.BooleanOptionalAction, default=True,
                        help="the native codec decodes each frame on one thread of the next CPU decoder step while the step's other threads start it (default on; that frame's audio leaves one step later)")
    stream.add_argument("--buffer-ms", type=float, default=60.0)
    stream.add_argument("--reprime-chunk", type=int, default=32, metavar="POSITIONS",
                        help="positions of the window's re-prime run per step")
    stream.add_argument("--reprime-budget-ms", type=float, metavar="MS",
                        help="instead, the largest slice that keeps a step within MS, from the measured costs")
    stream.add_argument("--concepts", type=int, default=0, metavar="K",
                        help="steer K concepts of a random concept pack, as a live session steers a pack")
    stream.add_argument("--strength", type=float, default=1.0, help="the steered concepts' strength")
    stream.add_argument("--meters", action="store_true",
                        help="the OSC server on, with a listener subscribed to the meters (published every frame)")
    stream.add_argument("--window-cost", action="store_true",
                        help="after the stream, time the decoder step by window position and the re-prime's prefill "
                             "by slice size (like for like, in rounds), and predict the cost per frame of other windows")
    stream.add_argument("--note", metavar="TEXT", help="a note kept in the JSON record")
    stream.add_argument("--json", type=Path, metavar="FILE")
    stream.set_defaults(run=run_stream)

    control = bsub.add_parser("control", help="control-to-sound latency through OSC, the stream and the device")
    add_model_args(control)
    control.add_argument("--device", metavar="NAME", help="audio output device (default: JACK or the system's)")
    control.add_argument("--messages", type=int, default=100)
    control.add_argument("--interval", type=float, default=0.15, metavar="SECONDS", help="mean gap between changes")
    control.add_argument("--buffer-ms", type=float, default=60.0)
    control.add_argument("--codec-chunk", type=int, default=1, metavar="FRAMES", help="frames per codec decode")
    control.add_argument("--codec-precision", choices=("float32", "int8"), default="float32",
                         help="the stateful codec's large weights, as live takes them")
    control.add_argument("--codec-overlap", action=argparse.BooleanOptionalAction, default=True,
                         help="the codec beside the next decoder step, as live has it (default on)")
    control.add_argument("--json", type=Path, metavar="FILE")
    control.set_defaults(run=run_control)

    prompts = bsub.add_parser("prompts", help="what a prompt change costs the producer: a live session receiving "
                                              "a new prompt over OSC (oscsend) every few seconds")
    add_model_args(prompts)
    prompts.add_argument("--seconds", type=float, default=30.0)
    prompts.add_argument("--every", type=float, default=2.0, metavar="SECONDS", help="time between prompt changes")
    prompts.add_argument("--buffer-ms", type=float, default=60.0)
    prompts.add_argument("--codec-precision", choices=("float32", "int8"), default="float32",
                         help="the stateful codec's large weights (as live --codec-precision)")
    prompts.add_argument("--prompt-worker", choices=("auto", "process", "thread"), default="auto",
                         help="where the prompts are built (as live --prompt-worker)")
    prompts.add_argument("--json", type=Path, metavar="FILE")
    prompts.set_defaults(run=run_prompts)

    codec = bsub.add_parser("codec", help="streaming codec cost per frame, early and late in a stream")
    add_model_args(codec)
    codec.add_argument("--frames", type=int, default=1000)
    codec.add_argument("--chunk", type=int, default=1)
    codec.add_argument("--method", choices=("state", "window"), default="state",
                       help="stateful layers (each frame decoded once) or a window decoded per chunk")
    codec.add_argument("--precision", choices=("float32", "int8"), default="float32",
                       help="the large weights (LSTM, first transposed convolutions): float32 (equal to the offline "
                            "decode) or int8 (an approximation; the record says its SNR)")
    codec.add_argument("--python", action="store_true",
                       help="the stateful decoder's Python stages (the reference) instead of its C plan")
    codec.add_argument("--threads", type=int, default=1, help="threads of the C plan (0: the OpenMP team)")
    codec.add_argument("--json", type=Path, metavar="FILE")
    codec.set_defaults(run=run_codec)

    fid = bsub.add_parser("fidelity", help="what reduced-precision weights lose against float32, on a random model")
    fid.add_argument("--model", default="small",
                     help="preset shape with random weights (default small), or a model directory whose decoder "
                          "weights to use (e.g. tests/fixtures/audiocraft_tiny)")
    fid.add_argument("--weights", action="append", choices=("full", "bf16", "int8", "int4"),
                     help="format to compare with float32 (repeatable; default bf16, int8, int4; full with "
                          "--kv-cache measures the cache alone)")
    fid.add_argument("--kv-cache", default="auto", choices=("auto", "float32", "bf16", "int8"),
                     help="the KV cache's storage for the formats under test (float32 is always compared with "
                          "a float32 cache)")
    fid.add_argument("--steps", type=int, default=200, help="teacher-forced one-token steps")
    fid.add_argument("--cfg", type=float, default=3.0)
    fid.add_argument("--seed", type=int, default=0, help="of the random weights and the text condition")
    fid.add_argument("--json", type=Path, metavar="FILE")
    fid.set_defaults(run=run_fidelity)


def run_latency(args: argparse.Namespace) -> int:
    from ..bench.latency import format_report
    from ..bench.latency import run_latency as time_steps
    from ..model.sampling import SamplingSettings
    from ..steering.plan import SteeringSettings

    try:
        counts = [int(k) for k in args.concepts.split(",")]
    except ValueError:
        raise UsageError(f"--concepts {args.concepts!r}: expected numbers like 0,1,4,16") from None
    if any(k < 0 for k in counts) or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise UsageError("--concepts, --steps, --warmup and --rounds must not be negative (--steps and --rounds "
                         "at least 1)")
    try:
        prompts = [int(n) for n in args.prompts.split(",")]
    except ValueError:
        raise UsageError(f"--prompts {args.prompts!r}: expected numbers like 1,2,4") from None
    if not all(1 <= n <= 8 for n in prompts):
        raise UsageError(f"--prompts {args.prompts}: a step blends 1 to 8 prompts")
    if args.plot:
        require(args, "matplotlib")  # before minutes of timing, not after
    model = load_from_args(args)
    if args.cuda_graph and model.decoder.embed.weight.device.type != "cuda":
        raise UsageError("--cuda-graph needs the model on a CUDA device (--compute cuda)")
    if args.steps + args.warmup + 1 > model.cfg.max_positions:
        raise UsageError(f"--steps + --warmup must stay under the model's {model.cfg.max_positions} positions")
    sampling = SamplingSettings(cfg=args.cfg, seed=0)
    if len(prompts) > 1:
        from ..bench.latency import format_prompt_costs, run_prompt_costs

        try:
            record = run_prompt_costs(model, args.steps, args.warmup, prompts, sampling, args.dtype, args.weights,
                                      args.cuda_graph)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        report(format_prompt_costs(record), record, args.json)
        return 0
    record = time_steps(model, args.steps, args.warmup, counts, sampling, SteeringSettings(mode=args.steer_mode),
                        args.dtype, baselines=args.baseline, floor=not args.no_floor, graph=args.cuda_graph,
                        weights=args.weights, rounds=args.rounds, prompts=prompts[0])
    report(format_report(record), record, args.json)
    if args.plot:
        from ..bench.latency import plot

        plot(record, args.plot)
        print(f"wrote {args.plot}")
    return 0


def report(text: str, record: dict, path: Path | None) -> None:
    """Print a bench's report and write its record whole to `path` (None: not written)."""
    from ..bench.latency import write_json

    print(text)
    if path:
        write_json(record, path)
        print(f"wrote {path}")


def emit(record: dict, path: Path | None) -> None:
    """Print the record (without the machine details) and write it whole to `path`."""
    import json

    report(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2), record, path)


def run_stream(args: argparse.Namespace) -> int:
    require(args, *STREAM, *(("pythonosc",) if args.meters else ()))
    import time

    from ..bench.stream import run_stream_bench

    if args.concepts < 0 or args.reprime_chunk < 2 or not args.seconds > 0:
        raise UsageError("--concepts must not be negative, --reprime-chunk must be at least 2 and --seconds positive")
    from ..live.window import default_window

    model = load_from_args(args)
    loaded = time.time()
    window_s, keep_s = default_window(model.decoder.embed.weight.device.type, args.window, args.keep)
    try:
        record = run_stream_bench(model, args.seconds, not args.fast, window_s, keep_s, args.buffer_ms,
                                  concepts=args.concepts, strength=args.strength, meters=args.meters,
                                  reprime_chunk=args.reprime_chunk, loaded_at=loaded, note=args.note,
                                  precision={"dtype": args.dtype, "weights": args.weights, "kv_cache": args.kv_cache,
                                             "codec": args.codec_precision, "codec_threads": args.codec_threads,
                                             "codec_overlap": args.codec_overlap},
                                  window_cost=args.window_cost, reprime_budget_ms=args.reprime_budget_ms,
                                  codec_precision=args.codec_precision, codec_threads=args.codec_threads,
                                  codec_overlap=args.codec_overlap)
    except ValueError as exc:  # stream settings that cannot work with this model
        raise UsageError(str(exc)) from exc
    emit(record, args.json)
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    require(args, *STREAM, "pythonosc")
    from ..bench.prompts import format_report, run_prompt_bench

    if not (args.seconds > 0 and 0 < args.every < args.seconds):
        raise UsageError("--seconds must be positive and --every between 0 and --seconds")
    record = run_prompt_bench(load_from_args(args), args.seconds, args.every, args.buffer_ms,
                              codec_precision=args.codec_precision, prompt_worker=args.prompt_worker)
    report(format_report(record), record, args.json)
    return 0 if record["clean"] else 1


def run_control(args: argparse.Namespace) -> int:
    require(args, *STREAM, "pythonosc", "sounddevice")
    from ..bench.control import format_control, run_control_bench

    if args.messages < 1 or not args.interval > 0 or args.codec_chunk < 1:
        raise UsageError("--messages and --codec-chunk must be >= 1 and --interval > 0")
    record = run_control_bench(load_from_args(args), args.device, args.messages, args.interval, args.buffer_ms,
                               codec_chunk=args.codec_chunk, codec_precision=args.codec_precision,
                               codec_overlap=args.codec_overlap)
    report(format_control(record), record, args.json)
    return 0


def run_fidelity(args: argparse.Namespace) -> int:
    from ..bench.fidelity import format_fidelity
    from ..bench.fidelity import run_fidelity as measure_all

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    try:
        record = measure_all(args.model, args.weights or ["bf16", "int8", "int4"], args.steps, args.cfg, args.seed,
                             args.kv_cache)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    report(format_fidelity(record), record, args.json)
    return 0


def run_codec(args: argparse.Namespace) -> int:
    from ..bench.codec import run_codec_bench

    if args.frames < 100:
        raise UsageError("--frames must be at least 100")
    if args.chunk < 1:
        raise UsageError("--chunk must be at least 1")
    if args.threads < 0:
        raise UsageError("--threads must be 0 (the OpenMP team) or more")
    emit(run_codec_bench(load_from_args(args), args.frames, args.chunk, args.method, args.precision,
                         native=not args.python, threads=args.threads), args.json)
    return 0
