"""What the commands share: the model, sampling and steering options, and turning them into
a loaded model and settings objects. Option errors become `UsageError` (one line, exit 2).

Torch and the model code are imported inside the functions, so that building the parser
imports neither.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..steering import modes as steering_modes  # the mode registry; imports no torch


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="preset (tiny, small, medium, large), a model directory, or a cached Hugging Face repo id")
    p.add_argument("--text-encoder", metavar="DIR", help="T5 directory overriding the one the checkpoint names")
    p.add_argument("--codec", metavar="DIR", help="EnCodec directory overriding the one the checkpoint names")
    p.add_argument("--compute", default="auto", metavar="DEVICE",
                   help="where the model runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--weights", default="full", choices=("full", "bf16", "int8", "int4"),
                   help="CPU: bf16, the decoder's linear weights as bfloat16 (half the float32 bytes; --dtype "
                        "bfloat16 on CPU does the same); int8, int8 per output channel (a quarter); int4, 4-bit "
                        "in groups of 64 inputs (a seventh); each keeps float32 activations and a bfloat16 KV "
                        "cache (half the cache bytes)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "float32", "bf16", "int8"),
                   help="CPU: storage of the self-attention caches; auto is bfloat16 with reduced weights and "
                        "the model's dtype otherwise; int8 is 8-bit with a scale per head and position (a "
                        "quarter of float32's bytes: the cache is most of a step's reads late in a long window)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 disables)")
    p.add_argument("--top-k", type=int, default=250)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)


def add_steering_args(p: argparse.ArgumentParser) -> None:
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


def compute_device(name: str):
    """The torch device `--compute NAME` names; `auto` is the GPU when there is one."""
    from ..backends.select import resolve_device  # torch: only once a command runs

    return resolve_device(name, "--compute")


def load_from_args(args: argparse.Namespace):
    """The model the options name. Commands without --text-encoder, --codec, --dtype or
    --weights get the checkpoint's own parts in float32 with full weights."""
    import torch

    from ..model.loading.load import load_model

    return load_model(args.model, text_encoder=getattr(args, "text_encoder", None),
                      codec=getattr(args, "codec", None), device=compute_device(args.compute),
                      dtype=getattr(torch, getattr(args, "dtype", "float32")),
                      weights=getattr(args, "weights", "full"), kv_cache=getattr(args, "kv_cache", "auto"))


def sampling_settings(args: argparse.Namespace):
    from ..model.sampling import SamplingSettings

    try:
        return SamplingSettings(cfg=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                greedy=args.greedy, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def steering_settings(args: argparse.Namespace):
    from ..steering.plan import SteeringSettings

    try:
        return SteeringSettings(mode=args.steer_mode, rows=args.steer_rows, point=args.steer_point,
                                layers=args.steer_layers, kappa=args.kappa, gate=args.gate, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
