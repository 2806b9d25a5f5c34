"""`musicsteer concepts make | list | show`: concept packs from random or given vectors, and
what a pack holds. Parses and delegates to `steering.pack`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError


def register(sub) -> None:
    concepts = sub.add_parser("concepts", help="make, list and inspect concept packs")
    csub = concepts.add_subparsers(dest="concepts_command", required=True)
    make = csub.add_parser("make", help="a pack from random or given vectors (before probes are trained)")
    make.add_argument("--model", required=True, help="the model the pack is for (its shape is what matters)")
    make.add_argument("--out", type=Path, required=True, metavar="PACK")
    make.add_argument("--random", nargs="+", default=[], metavar="NAME", help="concepts with random directions")
    make.add_argument("--vector", action="append", default=[], metavar="NAME=FILE.npy",
                      help="a concept from a [hidden] or [layers, hidden] array")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(run=run_make)
    for name, helptext in (("list", "the concepts in a pack"), ("show", "a pack's details")):
        p = csub.add_parser(name, help=helptext)
        p.add_argument("pack", type=Path, metavar="PACK")
        p.set_defaults(run=run_show, verbose=name == "show")


def run_make(args: argparse.Namespace) -> int:
    import numpy as np

    from ..model.loading.load import model_config
    from ..render import parse_assignments
    from ..steering.pack import ConceptPack

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
    pack = ConceptPack.made(cfg, args.model, args.random, vectors, seed=args.seed)
    pack.save(args.out)
    print(f"wrote {args.out} ({len(pack.names)} concepts for {cfg.layers} layers x {cfg.hidden})")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from ..steering.pack import ConceptPack

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
