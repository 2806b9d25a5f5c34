"""`musicsteer probes dataset`: parses, delegates to `dataset.build_dataset`, prints a summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError
from ..probes.theory import FAMILIES, FAMILY_NAMES, KEPT_PROGRAMS, RHYTHM_PROGRAMS
from .extras import require


def register(probes_subparsers) -> argparse.ArgumentParser:
    """Adds the `dataset` command to the subparsers of `musicsteer probes`."""
    p = probes_subparsers.add_parser(
        "dataset", help="synthesize labelled concept clips (MIDI rendered by FluidSynth) for probe training",
        description="Writes clips/<family>/<id>.wav and .mid, manifest.csv and dataset.json. Re-running with "
                    "the same --out renders only the clips that are missing.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--families", default=",".join(FAMILY_NAMES), metavar="F[,F...]",
                   help=f"concept families (default all: {','.join(FAMILY_NAMES)})")
    p.add_argument("--programs", metavar="P[,P...]|all|rhythm",
                   help="GM programs 0-127, with ranges like 24-28; 'all' = the 92 kept programs (default), "
                        "'rhythm' = the 25 with a clear attack")
    p.add_argument("--per-label", type=int, metavar="N", help="clips per label and program (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--soundfont", type=Path, metavar="PATH",
                   help="General MIDI .sf2 (default /usr/share/sounds/sf2/TimGM6mb.sf2)")
    p.add_argument("--sample-rate", type=int, default=32000, metavar="HZ")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="rendering processes (default: the CPU count)")
    p.add_argument("--full", action="store_true",
                   help="SynTheory's sizes: programs and clips per label chosen per family (104,585 clips)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: --workers processes here; ray: one task per clip on a Ray cluster (docs/ray.md)")
    p.add_argument("--address", metavar="auto|HOST:PORT",
                   help="ray: the cluster to join (default: RAY_ADDRESS, else a local Ray of --workers CPUs)")
    p.set_defaults(run=run_dataset)
    return p


def parse_programs(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "all":
        return KEPT_PROGRAMS
    if text.strip().lower() == "rhythm":
        return RHYTHM_PROGRAMS
    out: list[int] = []
    try:
        for part in filter(None, (s.strip() for s in text.split(","))):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if not 0 <= first <= last <= 127:
                raise ValueError
            out.extend(range(first, last + 1))
    except ValueError:
        raise UsageError(f"--programs {text!r}: expected GM program numbers 0-127 (like 0,24,40-42), "
                         "'all' or 'rhythm'") from None
    if not out:
        raise UsageError("--programs names no program")
    return tuple(dict.fromkeys(out))


def parse_families(text: str) -> list[str]:
    fams = [f.strip() for f in text.split(",") if f.strip()]
    for f in fams:
        if f not in FAMILIES:
            raise UsageError(f"--families: unknown family {f!r}; known: {','.join(FAMILY_NAMES)}")
    if not fams:
        raise UsageError("--families names no family")
    return list(dict.fromkeys(fams))


def run_dataset(args) -> int:
    require(args, "mido", "soundfile")
    from ..probes.dataset import (
        build_dataset,
        find_fluidsynth,
        find_soundfont,
        full_preset,
        resolve_plan,
    )

    families = parse_families(args.families)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {args.workers})")
    if args.full:
        if args.programs is not None or args.per_label is not None:
            raise UsageError("--full chooses the programs and clips per label itself; drop --programs/--per-label")
        programs, per_label = full_preset(families)
    else:
        programs = parse_programs(args.programs) if args.programs is not None else KEPT_PROGRAMS
        per_label = 1 if args.per_label is None else args.per_label
        if per_label < 1:
            raise UsageError(f"--per-label must be at least 1 (got {per_label})")
    fams, progs, per = resolve_plan(families, programs, per_label)
    find_fluidsynth(), find_soundfont(args.soundfont)  # say what is missing before announcing the work
    planned = sum(len(FAMILIES[f].labels) * len(progs[f]) * per[f] for f in fams)
    render_all = None
    if args.engine == "ray":
        from ..probes.distributed.cluster import require_ray
        from ..probes.distributed.dataset_ray import ray_renderer

        require_ray("probes dataset --engine ray")
        render_all = ray_renderer(args.address, num_cpus=args.workers)
        print(f"{planned} clips into {args.out} on Ray ({args.address or 'RAY_ADDRESS or a local Ray'})", flush=True)
    elif args.address is not None:
        raise UsageError("--address only applies with --engine ray")
    else:
        print(f"{planned} clips into {args.out} with {args.workers} worker(s)", flush=True)
    report = build_dataset(args.out, fams, progs, per, seed=args.seed, soundfont=args.soundfont,
                           sample_rate=args.sample_rate, workers=args.workers, progress=not args.no_progress,
                           render_all=render_all)
    rate = report.rendered / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.total} clips in {report.out_dir}: {report.rendered} rendered, {report.skipped} already there; "
          f"{report.seconds:.1f} s ({rate:.1f} clips/s)")
    for f in fams:
        n_labels = len(FAMILIES[f].labels)
        print(f"  {f:16s} {report.counts[f]:7d} clips  ({n_labels} labels x {len(progs[f])} programs x {per[f]})")
    print(f"wrote {report.out_dir / 'manifest.csv'} and {report.out_dir / 'dataset.json'}")
    return 0
