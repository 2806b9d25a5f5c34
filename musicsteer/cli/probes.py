"""`musicsteer probes dataset | extract | train | eval`: thin entry points over the
probes package (datasets, extraction, training, evaluation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from . import probes_dataset as dataset_cli
from .common import load_from_args
from .extras import require


def register(sub) -> None:
    probes = sub.add_parser("probes", help="learn concept directions: datasets, extraction, training, evaluation")
    psub = probes.add_subparsers(dest="probes_command", required=True)
    dataset_cli.register(psub)

    ex = psub.add_parser("extract", help="per-layer hidden states of a dataset's clips, stored for training")
    ex.add_argument("--model", required=True)
    ex.add_argument("--dataset", type=Path, required=True, metavar="DIR")
    ex.add_argument("--out", type=Path, required=True, metavar="FEATURES_DIR")
    ex.add_argument("--prompt", default="music", help="text of the conditional row (as in generation)")
    ex.add_argument("--no-text", action="store_true", help="the null text instead of --prompt (MusicRFM's setup)")
    ex.add_argument("--no-delay", action="store_true", help="codes without the delay pattern (MusicRFM's setup)")
    ex.add_argument("--point", default="out", choices=("out", "attn"),
                    help="what to extract: the residual stream after each block (out), or the self-attention "
                         "output (attn); steer a pack at the point it was extracted at (--steer-point)")
    ex.add_argument("--per-frame", action="store_true", help="also keep per-position states (float16)")
    ex.add_argument("--batch", type=int, default=8)
    ex.add_argument("--compute", default="auto", metavar="DEVICE")
    ex.add_argument("--no-progress", action="store_true")
    ex.set_defaults(run=run_extract)

    tr = psub.add_parser("train", help="probes per layer and concept -> a concept pack")
    tr.add_argument("--features", type=Path, required=True, metavar="DIR")
    tr.add_argument("--out", type=Path, required=True, metavar="PACK")
    tr.add_argument("--method", default="rfm", choices=("rfm", "linear", "logistic", "diffmean"))
    tr.add_argument("--families", metavar="F[,F...]")
    tr.add_argument("--concepts", metavar="NAME[,NAME...]")
    tr.add_argument("--val-fraction", type=float, default=0.2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--budget", type=int, help="RFM hyper-parameter trials per layer and concept (default: the "
                                                "recipe's, 8 or 100)")
    tr.add_argument("--recipe", default="musicsteer", choices=("musicsteer", "musicrfm"),
                    help="RFM search: the project's (8 trials, the same at every layer, kept by validation MSE, "
                         "features scaled), or MusicRFM's code (100 trials drawn per layer, kept by validation "
                         "AUC, raw features, kernel l2_high_dim, 8 iterations)")
    tr.add_argument("--max-train", type=int, default=4000, help="training clips per probe at most")
    tr.add_argument("--no-eval", action="store_true", help="skip the multiclass evaluation probes")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(run=run_train)

    ev = psub.add_parser("eval", help="probe accuracy on held-out clips and on steered generations")
    ev.add_argument("--model", required=True)
    ev.add_argument("--features", type=Path, required=True, metavar="DIR", help="the training features")
    ev.add_argument("--concepts", type=Path, required=True, metavar="PACK")
    ev.add_argument("--family", required=True)
    ev.add_argument("--strengths", default="0,0.15,0.3,0.6", metavar="S[,S...]")
    ev.add_argument("--per-concept", type=int, default=4, help="generations per concept and strength")
    ev.add_argument("--duration", type=float, default=4.0, metavar="SECONDS")
    ev.add_argument("--prompt", default="music")
    ev.add_argument("--gate", type=float, default=0.3, help="steering probability (MusicRFM: 0.3)")
    ev.add_argument("--gate-per", default="layer", choices=("layer", "step"),
                    help="one gate draw per layer and concept at every step (MusicRFM's code, the default), or "
                         "one per step for all of them (render's and live's default)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", type=Path, metavar="FILE")
    ev.add_argument("--compute", default="auto", metavar="DEVICE")
    ev.set_defaults(run=run_eval)


def run_extract(args: argparse.Namespace) -> int:
    require(args, "soundfile")
    from ..probes.extract import ExtractSettings, extract

    settings = ExtractSettings(prompt=args.prompt, delay=not args.no_delay, text=not args.no_text,
                               per_frame=args.per_frame, batch=max(args.batch, 1), point=args.point)
    out = extract(load_from_args(args), args.dataset, args.out, settings, progress=not args.no_progress)
    print(f"wrote {out} (pooled.npy, index.csv, meta.json)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    require(args, *(("xrfm",) if args.method == "rfm" else ()), "matplotlib")
    from ..probes.train import evaluation_table, train_pack

    split = (lambda text: [t for t in text.split(",") if t] if text else None)
    pack = train_pack(args.features, concepts=split(args.concepts), method=args.method,
                      families=split(args.families), val_fraction=args.val_fraction, seed=args.seed,
                      budget=args.budget, out_dir=args.out, max_train=args.max_train, evaluate=not args.no_eval,
                      progress=not args.no_progress, recipe_name=args.recipe)
    print(f"wrote {args.out}: {len(pack.names)} concepts, method {args.method}"
          + (f", recipe {args.recipe}" if args.method == "rfm" else ""))
    best: dict[str, tuple[int, float]] = {}
    for row in evaluation_table(pack):
        if row["family"] not in best or row["score"] > best[row["family"]][1]:
            best[row["family"]] = (row["layer"], row["score"])
    for family, (layer, score) in best.items():
        print(f"  {family:16s} best multiclass score {score:.3f} at layer {layer}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..bench.latency import write_json
    from ..probes.evaluate import format_eval, run_generation_eval

    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        raise UsageError(f"--strengths {args.strengths!r}: expected numbers like 0,0.3,0.6") from None
    record = run_generation_eval(load_from_args(args), args.features, args.concepts, args.family, strengths,
                                 args.per_concept, args.duration, args.prompt, args.gate, args.seed,
                                 gate_per=args.gate_per)
    print(format_eval(record))
    if args.json:
        write_json(record, args.json)
        print(f"wrote {args.json}")
    return 0
