"""`musicsteer render`: parses, delegates to `render.render` (or replays a recorded session)
and prints what it wrote. It needs no package beyond the core ones."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from .common import (
    add_model_args,
    add_sampling_args,
    add_steering_args,
    load_from_args,
    sampling_settings,
    steering_settings,
)
from .extras import STREAM, require


def register(sub) -> None:
    render = sub.add_parser("render", help="generate a clip offline and write a WAV")
    add_model_args(render, required=False)
    render.add_argument("--prompt")
    render.add_argument("--duration", type=float, metavar="SECONDS")
    render.add_argument("--out", type=Path, metavar="FILE.wav")
    render.add_argument("--replay", type=Path, metavar="SESSION_DIR",
                        help="re-create a recorded live session's tokens (model and prompt from the recording)")
    render.add_argument("--save-tokens", type=Path, metavar="FILE.npy", help="write the codes, int64 [4, frames]")
    render.add_argument("--no-progress", action="store_true")
    add_sampling_args(render)
    add_steering_args(render)
    render.set_defaults(run=run_render)


def run_render(args: argparse.Namespace) -> int:
    from ..render import RenderRequest, parse_assignments, parse_strengths, render

    if args.replay is not None:
        return run_replay(args)
    missing = [flag for flag, value in (("--model", args.model), ("--prompt", args.prompt),
                                        ("--duration", args.duration), ("--out", args.out)) if value is None]
    if missing:
        raise UsageError(f"render needs {', '.join(missing)} (or --replay SESSION_DIR)")
    settings, steering = sampling_settings(args), steering_settings(args)
    steer, schedules = parse_strengths(args.steer), parse_assignments(args.schedule, "--schedule")
    model = load_from_args(args)
    request = RenderRequest(prompt=args.prompt, duration=args.duration, out=args.out, settings=settings,
                            save_tokens=args.save_tokens, progress=not args.no_progress, concepts=args.concepts,
                            steer=steer, schedules=schedules, steering=steering)
    result = render(model, request)
    print(f"wrote {args.out} ({result.codes.shape[1]} frames, {result.codes.shape[1] / 50:.2f} s)")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    require(args, *STREAM)  # a replay runs the live producer again
    from ..live.recorder import load_session
    from ..live.session import write_replay

    info, _, _ = load_session(args.replay)
    if args.model is None:
        args.model = info["model"]
    if args.out is None and args.save_tokens is None:
        raise UsageError("--replay needs --out FILE.wav and/or --save-tokens FILE.npy")
    model = load_from_args(args)
    tokens = write_replay(model, args.replay, args.out, args.save_tokens)
    print(f"replayed {args.replay}: {tokens.shape[1]} frames ({tokens.shape[1] / 50:.2f} s)")
    return 0
