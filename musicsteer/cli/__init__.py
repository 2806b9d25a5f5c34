"""The `musicsteer` command line. It parses and delegates; user errors become one
line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import MusicsteerError, UsageError
from ..steering import modes as steering_modes  # the mode registry; imports no torch


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="preset (tiny, small, medium, large), a model directory, or a cached Hugging Face repo id")
    p.add_argument("--text-encoder", metavar="DIR", help="T5 directory overriding the one the checkpoint names")
    p.add_argument("--codec", metavar="DIR", help="EnCodec directory overriding the one the checkpoint names")
    p.add_argument("--compute", default="auto", metavar="DEVICE",
                   help="where the model runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--weights", default="full", choices=("full", "int8"),
                   help="int8: the decoder's linear weights as int8 per output channel and its KV cache as "
                        "bfloat16 (CPU; a quarter of the weight bytes, half the cache bytes)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 disables)")
    p.add_argument("--top-k", type=int, default=250)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsteer", description="Play MusicGen live while steering it.")
    parser.add_argument("--version", action="version", version=f"musicsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser("render", help="generate a clip offline and write a WAV")
    _add_model_args(render, required=False)
    render.add_argument("--prompt")
    render.add_argument("--duration", type=float, metavar="SECONDS")
    render.add_argument("--out", type=Path, metavar="FILE.wav")
    render.add_argument("--replay", type=Path, metavar="SESSION_DIR",
                        help="re-create a recorded live session's tokens (model and prompt from the recording)")
    render.add_argument("--save-tokens", type=Path, metavar="FILE.npy", help="write the codes, int64 [4, frames]")
    render.add_argument("--no-progress", action="store_true")
    _add_sampling_args(render)
    _add_steering_args(render)
    render.set_defaults(run=run_render)

    live = sub.add_parser("live", help="play and steer MusicGen in real time")
    _add_model_args(live)
    live.add_argument("--prompt", required=True)
    out = live.add_mutually_exclusive_group()
    out.add_argument("--device", metavar="NAME", help="audio output device (default: the system's)")
    out.add_argument("--out", type=Path, metavar="FILE.wav", help="play into a WAV file in real time")
    out.add_argument("--null", nargs="?", const="realtime", choices=("realtime", "fast"),
                     help="play nowhere, paced in real time (default) or as fast as possible")
    live.add_argument("--seconds", type=float, metavar="N", help="stop after N seconds of audio")
    live.add_argument("--record", type=Path, metavar="SESSION_DIR", help="record a replayable session")
    live.add_argument("--buffer-ms", type=float, default=60.0,
                      help="audio buffered ahead of playback: lower is more responsive, higher is safer")
    live.add_argument("--window", type=float, default=30.0, metavar="SECONDS", help="context the model sees")
    live.add_argument("--keep", type=float, default=10.0, metavar="SECONDS",
                      help="context kept when the window rolls over")
    live.add_argument("--codec-chunk", type=int, default=1, metavar="FRAMES", help="frames per codec decode")
    live.add_argument("--codec-method", choices=("state", "window"), default="state",
                      help="streaming codec: stateful layers (default) or a window decoded per chunk")
    live.add_argument("--no-status", action="store_true", help="no status line")
    live.add_argument("--osc-port", type=int, default=9000, help="UDP port for OSC control (0: any free port)")
    live.add_argument("--osc-host", default="127.0.0.1", help="address OSC listens on (default loopback only)")
    live.add_argument("--osc-smooth-ms", type=float, default=0.0, help="smoothing of OSC-set numbers")
    live.add_argument("--no-osc", action="store_true", help="no OSC server")
    live.add_argument("--map", type=Path, metavar="MAPPING.toml", help="MIDI mapping file (CCs, notes, pitch bend)")
    live.add_argument("--midi-in", metavar="NAME", help="MIDI input to follow (JACK MIDI source; see midi ports)")
    _add_sampling_args(live)
    _add_steering_args(live)
    live.set_defaults(run=run_live_cli)

    from . import midi as midi_cli
    from . import probes as probes_cli

    midi_cli.register(sub)
    probes_cli.register(sub)

    concepts = sub.add_parser("concepts", help="make, list and inspect concept packs")
    csub = concepts.add_subparsers(dest="concepts_command", required=True)
    make = csub.add_parser("make", help="a pack from random or given vectors (before probes are trained)")
    make.add_argument("--model", required=True, help="the model the pack is for (its shape is what matters)")
    make.add_argument("--out", type=Path, required=True, metavar="PACK")
    make.add_argument("--random", nargs="+", default=[], metavar="NAME", help="concepts with random directions")
    make.add_argument("--vector", action="append", default=[], metavar="NAME=FILE.npy",
                      help="a concept from a [hidden] or [layers, hidden] array")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(run=run_concepts_make)
    for name, helptext in (("list", "the concepts in a pack"), ("show", "a pack's details")):
        p = csub.add_parser(name, help=helptext)
        p.add_argument("pack", type=Path, metavar="PACK")
        p.set_defaults(run=run_concepts_show, verbose=name == "show")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    lat = bsub.add_parser("latency", help="per-token time of the generation loop, with and without steering")
    _add_model_args(lat)
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
                     help="also time a reference implementation on the same shape (repeatable)")
    lat.add_argument("--no-floor", action="store_true", help="skip measuring the memory-bandwidth floor")
    lat.add_argument("--rounds", type=int, default=1,
                     help="take turns between the concept counts in this many rounds, sampling the bandwidth "
                          "between them (for noisy shared hosts)")
    lat.add_argument("--cuda-graph", action="store_true",
                     help="replay each step as one captured CUDA graph (needs --compute cuda)")
    lat.set_defaults(run=run_bench_latency)
    stream = bsub.add_parser("stream", help="a long live stream: gaps, re-primes, memory over time")
    _add_model_args(stream)
    stream.add_argument("--seconds", type=float, default=150.0)
    stream.add_argument("--fast", action="store_true", help="as fast as possible instead of real-time paced")
    stream.add_argument("--window", type=float, default=30.0)
    stream.add_argument("--keep", type=float, default=10.0)
    stream.add_argument("--buffer-ms", type=float, default=60.0)
    stream.add_argument("--json", type=Path, metavar="FILE")
    stream.set_defaults(run=run_bench_stream)
    control = bsub.add_parser("control", help="control-to-sound latency through OSC, the stream and the device")
    _add_model_args(control)
    control.add_argument("--device", metavar="NAME", help="audio output device (default: JACK or the system's)")
    control.add_argument("--messages", type=int, default=100)
    control.add_argument("--interval", type=float, default=0.15, metavar="SECONDS", help="mean gap between changes")
    control.add_argument("--buffer-ms", type=float, default=60.0)
    control.add_argument("--codec-chunk", type=int, default=1, metavar="FRAMES", help="frames per codec decode")
    control.add_argument("--json", type=Path, metavar="FILE")
    control.set_defaults(run=run_bench_control)
    codec = bsub.add_parser("codec", help="streaming codec cost per frame, early and late in a stream")
    _add_model_args(codec)
    codec.add_argument("--frames", type=int, default=1000)
    codec.add_argument("--chunk", type=int, default=1)
    codec.add_argument("--method", choices=("state", "window"), default="state",
                       help="stateful layers (each frame decoded once) or a window decoded per chunk")
    codec.add_argument("--json", type=Path, metavar="FILE")
    codec.set_defaults(run=run_bench_codec)
    return parser


def _add_steering_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", type=Path, metavar="PACK", help="concept pack directory")
    p.add_argument("--steer", action="append", metavar="NAME=STRENGTH", help="steer a concept (repeatable)")
    p.add_argument("--schedule", action="append", metavar="NAME=SPEC",
                   help="schedule a concept's strength: linear-up:T, linear-down:T, decay[:RATE], logistic:T, "
                        "sine:T, crossfade:OTHER:T, points:STEP=V,...; T in steps or seconds (4s)")
    p.add_argument("--steer-mode", default="add", choices=steering_modes.names(),
                   help=steering_modes.describe())
    p.add_argument("--steer-rows", default="both", choices=("both", "cond"), help="CFG rows to steer")
    p.add_argument("--steer-point", default="out", choices=("out", "attn"),
                   help="residual stream after each block, or the self-attention output")
    p.add_argument("--steer-layers", default="weighted", metavar="weighted|all|top:K")
    p.add_argument("--kappa", type=float, default=0.95, help="layer weights: minmax(score) ** (1/kappa)")
    p.add_argument("--gate", type=float, default=1.0, help="probability per step that steering is applied")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--compute {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--compute cuda asked for, but this machine has no CUDA GPU")
    return device


def _load(args):
    import torch

    from ..model.loading.load import load_model

    return load_model(args.model, text_encoder=args.text_encoder, codec=args.codec,
                      device=_device(args.compute), dtype=getattr(torch, args.dtype),
                      weights=getattr(args, "weights", "full"))


def _settings(args):
    from ..model.sampling import SamplingSettings

    try:
        return SamplingSettings(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                greedy=args.greedy, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _steering(args):
    from ..steering.plan import SteeringSettings

    try:
        return SteeringSettings(mode=args.steer_mode, rows=args.steer_rows, point=args.steer_point,
                                layers=args.steer_layers, kappa=args.kappa, gate=args.gate, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_render(args) -> int:
    from ..render import RenderRequest, parse_assignments, parse_strengths, render

    if args.replay is not None:
        return run_replay(args)
    missing = [flag for flag, value in (("--model", args.model), ("--prompt", args.prompt),
                                        ("--duration", args.duration), ("--out", args.out)) if value is None]
    if missing:
        raise UsageError(f"render needs {', '.join(missing)} (or --replay SESSION_DIR)")
    settings, steering = _settings(args), _steering(args)
    steer, schedules = parse_strengths(args.steer), parse_assignments(args.schedule, "--schedule")
    model = _load(args)
    request = RenderRequest(prompt=args.prompt, duration=args.duration, out=args.out, settings=settings,
                            save_tokens=args.save_tokens, progress=not args.no_progress, concepts=args.concepts,
                            steer=steer, schedules=schedules, steering=steering)
    result = render(model, request)
    print(f"wrote {args.out} ({result.codes.shape[1]} frames, {result.codes.shape[1] / 50:.2f} s)")
    return 0


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would drown the one-line messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_replay(args) -> int:
    from ..live.recorder import load_session
    from ..live.session import write_replay

    info, _, _ = load_session(args.replay)
    if args.model is None:
        args.model = info["model"]
    if args.out is None and args.save_tokens is None:
        raise UsageError("--replay needs --out FILE.wav and/or --save-tokens FILE.npy")
    model = _load(args)
    tokens = write_replay(model, args.replay, args.out, args.save_tokens)
    print(f"replayed {args.replay}: {tokens.shape[1]} frames ({tokens.shape[1] / 50:.2f} s)")
    return 0


def run_live_cli(args) -> int:
    import signal
    import threading

    from ..codec.stream import StreamingCodecSettings
    from ..live.session import LiveRequest, run_live
    from ..render import parse_assignments, parse_strengths

    settings, steering = _settings(args), _steering(args)
    if args.seconds is not None and not args.seconds > 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    try:
        codec = StreamingCodecSettings(chunk=args.codec_chunk, method=args.codec_method)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    request = LiveRequest(
        prompt=args.prompt, sampling=settings, out=args.out, null=args.null, device=args.device,
        seconds=args.seconds, record=args.record, concepts=args.concepts, steer=parse_strengths(args.steer),
        schedules=parse_assignments(args.schedule, "--schedule"), steering=steering, buffer_ms=args.buffer_ms,
        osc_port=None if args.no_osc else args.osc_port, osc_host=args.osc_host, osc_smooth_ms=args.osc_smooth_ms,
        mapping=args.map, midi_in=args.midi_in,
        window_s=args.window, keep_s=args.keep, codec=codec, status=not args.no_status)
    model = _load(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        result = run_live(model, request, stop=stop)
    except ValueError as exc:  # stream settings that cannot work with this model
        raise UsageError(str(exc)) from exc
    st = result.stats
    print(f"played {st.audio_s:.2f} s: {st.frames} frames, {st.underruns} underruns, "
          f"median step {st.step_ms_p50:.1f} ms, {st.reprimes} re-primes"
          + (f", recorded in {args.record}" if args.record else ""))
    if st.error:
        print(f"musicsteer: error: the stream stopped: {st.error}", file=sys.stderr)
        return 1
    return 0


def run_concepts_make(args) -> int:
    import numpy as np

    from ..model.loading.load import model_config
    from ..probes.pack import ConceptPack
    from ..render import parse_assignments

    vectors = {}
    for name, file in parse_assignments(args.vector, "--vector").items():
        try:
            vectors[name] = np.load(file)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--vector {name}={file}: cannot read a .npy array ({exc})") from exc
    if not vectors and not args.random:
        raise UsageError("concepts make needs --random NAME ... or --vector NAME=FILE.npy")
    clash = set(vectors) & set(args.random)
    if clash:
        raise UsageError(f"concept {sorted(clash)[0]!r} is given twice")
    cfg = model_config(args.model)
    pack = ConceptPack.random(args.random, cfg, args.model, seed=args.seed) if args.random else None
    if vectors:
        given = ConceptPack.from_vectors(vectors, cfg, args.model)
        pack = given if pack is None else ConceptPack({**pack.concepts, **given.concepts},
                                                      dict(pack.meta, method="random+user"))
    pack.save(args.out)
    print(f"wrote {args.out} ({len(pack.names)} concepts for {cfg.layers} layers x {cfg.hidden})")
    return 0


def run_concepts_show(args) -> int:
    from ..probes.pack import ConceptPack

    pack = ConceptPack.load(args.pack)
    if not args.verbose:
        print("\n".join(pack.names))
        return 0
    model = pack.meta["model"]
    print(f"pack {args.pack}: {len(pack.names)} concepts, model {model.get('id')} "
          f"({model['layers']} layers x {model['hidden']}), method {pack.meta.get('method')}")
    print(f"sign: {pack.meta.get('sign')}")
    for name in pack.names:
        c = pack[name]
        best = int(c.scores.argmax())
        print(f"  {name:16s} best layer {best:3d} (score {c.scores[best]:.3f}), "
              f"mean score {c.scores.mean():.3f}{', with clamp targets' if c.targets is not None else ''}")
    return 0


def run_bench_latency(args) -> int:
    from ..bench.latency import format_report, run_latency, write_json
    from ..model.sampling import SamplingSettings
    from ..steering.plan import SteeringSettings

    try:
        counts = [int(k) for k in args.concepts.split(",")]
    except ValueError:
        raise UsageError(f"--concepts {args.concepts!r}: expected numbers like 0,1,4,16") from None
    if any(k < 0 for k in counts) or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise UsageError("--concepts, --steps, --warmup and --rounds must not be negative (--steps and --rounds "
                         "at least 1)")
    model = _load(args)
    if args.cuda_graph and model.decoder.embed.weight.device.type != "cuda":
        raise UsageError("--cuda-graph needs the model on a CUDA device (--compute cuda)")
    if args.steps + args.warmup + 1 > model.cfg.max_positions:
        raise UsageError(f"--steps + --warmup must stay under the model's {model.cfg.max_positions} positions")
    sampling = SamplingSettings(cfg=args.cfg, seed=0)
    record = run_latency(model, args.steps, args.warmup, counts, sampling, SteeringSettings(mode=args.steer_mode),
                         args.dtype, baselines=args.baseline, floor=not args.no_floor, graph=args.cuda_graph,
                         weights=args.weights, rounds=args.rounds)
    print(format_report(record))
    if args.json:
        write_json(record, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        from ..bench.latency import plot

        plot(record, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _emit(record: dict, path) -> None:
    import json

    from ..bench.latency import write_json

    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2))
    if path:
        write_json(record, path)
        print(f"wrote {path}")


def run_bench_stream(args) -> int:
    from ..bench.stream import run_stream_bench

    model = _load(args)
    _emit(run_stream_bench(model, args.seconds, not args.fast, args.window, args.keep, args.buffer_ms), args.json)
    return 0


def run_bench_control(args) -> int:
    from ..bench.control import format_control, run_control_bench

    if args.messages < 1 or not args.interval > 0 or args.codec_chunk < 1:
        raise UsageError("--messages and --codec-chunk must be >= 1 and --interval > 0")
    record = run_control_bench(_load(args), args.device, args.messages, args.interval, args.buffer_ms,
                               codec_chunk=args.codec_chunk)
    print(format_control(record))
    if args.json:
        from ..bench.latency import write_json

        write_json(record, args.json)
        print(f"wrote {args.json}")
    return 0


def run_bench_codec(args) -> int:
    from ..bench.stream import run_codec_bench

    if args.frames < 100:
        raise UsageError("--frames must be at least 100")
    if args.chunk < 1:
        raise UsageError("--chunk must be at least 1")
    _emit(run_codec_bench(_load(args), args.frames, args.chunk, args.method), args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args)
    except MusicsteerError as exc:
        print(f"musicsteer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("musicsteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
