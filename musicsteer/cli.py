"""The `musicsteer` command line. It parses and delegates; user errors become one
line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import MusicsteerError, UsageError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="preset (tiny, small, medium, large), a model directory, or a cached Hugging Face repo id")
    p.add_argument("--text-encoder", metavar="DIR", help="T5 directory overriding the one the checkpoint names")
    p.add_argument("--codec", metavar="DIR", help="EnCodec directory overriding the one the checkpoint names")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))


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
    _add_model_args(render)
    render.add_argument("--prompt", required=True)
    render.add_argument("--duration", type=float, required=True, metavar="SECONDS")
    render.add_argument("--out", type=Path, required=True, metavar="FILE.wav")
    render.add_argument("--save-tokens", type=Path, metavar="FILE.npy", help="write the codes, int64 [4, frames]")
    render.add_argument("--no-progress", action="store_true")
    _add_sampling_args(render)
    render.set_defaults(run=run_render)
    return parser


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but this machine has no CUDA GPU")
    return device


def _load(args):
    import torch

    from .engine.loading import load_model

    return load_model(args.model, text_encoder=args.text_encoder, codec=args.codec,
                      device=_device(args.device), dtype=getattr(torch, args.dtype))


def _settings(args):
    from .engine.sampling import SamplingSettings

    try:
        return SamplingSettings(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                greedy=args.greedy, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_render(args) -> int:
    from .render import RenderRequest, render

    settings = _settings(args)
    model = _load(args)
    request = RenderRequest(prompt=args.prompt, duration=args.duration, out=args.out, settings=settings,
                            save_tokens=args.save_tokens, progress=not args.no_progress)
    result = render(model, request)
    print(f"wrote {args.out} ({result.codes.shape[1]} frames, {result.codes.shape[1] / 50:.2f} s)")
    return 0


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would drown the one-line messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


if __name__ == "__main__":
    sys.exit(main())
