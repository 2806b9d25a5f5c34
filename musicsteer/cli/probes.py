"""`musicsteer probes dataset | extract | train | eval`: thin entry points over the
probes package (datasets, extraction, training, evaluation)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import UsageError
from . import probes_dataset as dataset_cli
from .common import load_from_args
from .extras import command_name, require


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
    ex.add_argument("--batch", type=int, default=8, help="clips per chunk, the work unit (fixed once a store is begun)")
    ex.add_argument("--compute", default="auto", metavar="DEVICE")
    ex.add_argument("--no-progress", action="store_true")
    add_engine_args(ex)
    ex.add_argument("--workers", type=int, metavar="N",
                    help="ray: actors, each holding the model (default: one per GPU, else per --cpus-per-worker)")
    ex.add_argument("--gpus-per-worker", type=float, metavar="G", help="ray: GPUs per actor (default 1 if any, else 0)")
    ex.add_argument("--cpus-per-worker", type=float, metavar="C", help="ray: CPUs per actor (default 1)")
    ex.add_argument("--worker-dataset", metavar="DIR",
                    help="ray: the dataset's path as the workers see it (default: --dataset's absolute path)")
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
    add_engine_args(tr)
    tr.add_argument("--gpus-per-task", type=float, metavar="G",
                    help="ray: GPU share of each probe search (0.25: four searches per GPU); 0 runs them on CPU")
    tr.set_defaults(run=run_train)

    ev = psub.add_parser("eval", help="probe accuracy on held-out clips and on steered generations")
    ev.add_argument("--model", required=True)
    ev.add_argument("--features", type=Path, required=True, metavar="DIR", help="the training features")
    ev.add_argument("--concepts", type=Path, required=True, metavar="PACK")
    ev.add_argument("--family", required=True)
    ev.add_argument("--strengths", default="0,0.15,0.3,0.6", metavar="S[,S...]",
                    help="steering strengths; 0 is the unsteered baseline, a negative one steers along the flipped "
                         "direction (write --strengths=-0.3,0,0.3 when the list starts with a minus)")
    ev.add_argument("--targets", metavar="L[,L...]", help="steer toward these labels only (default: every concept "
                                                            "of the family)")
    ev.add_argument("--rows", default="both", choices=("both", "cond"), help="the CFG rows steered")
    ev.add_argument("--steer-mode", default="add", choices=("add", "norm", "clamp", "ablate"),
                    help="the steering mode (docs/steering.md); norm is scale-free: a strength a moves h by a|h|")
    ev.add_argument("--schedule", metavar="SPEC", help="multiply the targets' strengths by a schedule over the clip "
                                                        "(decay:0.98, linear-up:2s, ...; docs/steering.md)")
    ev.add_argument("--crossfade", action="append", default=[], metavar="A,B",
                    help="also steer from A to B over the clip (A fades out, B in); repeatable")
    ev.add_argument("--together", action="append", default=[], metavar="A,B[,...]",
                    help="also steer toward several concepts at once, each at the strength; repeatable")
    ev.add_argument("--pitch", action="store_true", help="notes: judge the audio's pitch class with CREPE")
    ev.add_argument("--crepe", default="tiny", choices=("tiny", "full"), help="CREPE's model for --pitch")
    ev.add_argument("--segments", type=int, default=4,
                    help="time segments the rates are also given for: CREPE's shares, and the probes on each "
                         "segment's pooled states (default 4)")
    ev.add_argument("--program-probe", action="store_true",
                    help="text-adherence stand-in: the share of generations a probe on the GM program classifies "
                         "as --prompt-program")
    ev.add_argument("--prompt-program", type=int, metavar="N", help="the GM program the prompt names (0-127)")
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


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process; ray: a Ray cluster (docs/ray.md)")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="ray: the cluster to join (default: RAY_ADDRESS, else a local Ray started for the run)")


def ray_engine(args: argparse.Namespace, *ray_only: str) -> bool:
    """Whether the command runs on Ray (checking Ray is installed); options that only apply
    to Ray (`address` and `ray_only`) given without it are a usage error."""
    if args.engine == "ray":
        from ..probes.distributed.cluster import require_ray

        require_ray(f"{command_name(args)} --engine ray")
        return True
    given = [f"--{k.replace('_', '-')}" for k in ("address", *ray_only) if getattr(args, k, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --engine ray")
    return False


def run_extract(args: argparse.Namespace) -> int:
    require(args, "soundfile")
    on_ray = ray_engine(args, "workers", "gpus_per_worker", "cpus_per_worker", "worker_dataset")
    from ..probes.extract import ExtractSettings, extract

    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1 (got {args.batch})")
    settings = ExtractSettings(prompt=args.prompt, delay=not args.no_delay, text=not args.no_text,
                               per_frame=args.per_frame, batch=args.batch, point=args.point)
    if on_ray:
        from ..probes.distributed.extract_ray import ModelSpec, PoolSettings, extract_ray

        pool = PoolSettings(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                            cpus_per_worker=args.cpus_per_worker or 1.0, worker_dataset=args.worker_dataset)
        out = extract_ray(ModelSpec(args.model), args.dataset, args.out, settings, pool,
                          progress=not args.no_progress, log=lambda line: print(line, flush=True))
    else:
        out = extract(load_from_args(args), args.dataset, args.out, settings, progress=not args.no_progress)
    print(f"wrote {out} (pooled.npy, index.csv, meta.json)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    require(args, *(("xrfm",) if args.method == "rfm" else ()), "matplotlib")
    on_ray = ray_engine(args, "gpus_per_task")
    from ..probes.train import evaluation_table, train_pack

    split = (lambda text: [t for t in text.split(",") if t] if text else None)
    engine = None
    if on_ray:
        from ..probes.distributed.train_ray import ray_fitter

        engine = ray_fitter(args.address, gpus_per_task=args.gpus_per_task or 0.0)
    pack = train_pack(args.features, concepts=split(args.concepts), method=args.method,
                      families=split(args.families), val_fraction=args.val_fraction, seed=args.seed,
                      budget=args.budget, out_dir=args.out, max_train=args.max_train, evaluate=not args.no_eval,
                      progress=not args.no_progress, recipe_name=args.recipe, engine=engine)
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
    require(args, *(("scipy",) if args.pitch else ()))
    from ..bench.latency import write_json
    from ..probes.eval_report import format_eval
    from ..probes.evaluate import EvalOptions, run_generation_eval

    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        raise UsageError(f"--strengths {args.strengths!r}: expected numbers like 0,0.3,0.6") from None
    if not all(math.isfinite(s) for s in strengths):
        raise UsageError(f"--strengths {args.strengths!r}: strengths must be finite")
    if args.program_probe != (args.prompt_program is not None):
        raise UsageError("--program-probe and --prompt-program N go together (N: the GM program the prompt names)")
    if args.pitch:
        from ..probes.pitch import import_torchcrepe

        import_torchcrepe()  # a missing torchcrepe is one line now, not after the first generation
    elif args.crepe != "tiny":
        raise UsageError("--crepe only applies with --pitch")
    if args.segments < 1:
        raise UsageError(f"--segments must be at least 1 (got {args.segments})")
    options = EvalOptions(rows=args.rows, mode=args.steer_mode, targets=tuple(args.targets.split(",")) if args.targets else None,
                          schedule=args.schedule, crossfades=tuple(args.crossfade), together=tuple(args.together),
                          pitch=args.crepe if args.pitch else None, segments=args.segments,
                          program=args.prompt_program)
    record = run_generation_eval(load_from_args(args), args.features, args.concepts, args.family, strengths,
                                 args.per_concept, args.duration, args.prompt, args.gate, args.seed,
                                 gate_per=args.gate_per, options=options)
    print(format_eval(record))
    if args.json:
        write_json(record, args.json)
        print(f"wrote {args.json}")
    return 0
