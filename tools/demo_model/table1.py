"""MusicRFM's Table 1 in miniature, on the demo model: per-layer multiclass probe accuracy per
family (notes, intervals, chords) for RFM, ridge, logistic regression and difference of means,
with the project's default features (delay pattern, the prompt as generated) against MusicRFM's
layout (`--no-delay --no-text`).

    python tools/demo_model/table1.py --model demo --dataset tools/demo_model/runs/data_probes \
        --work tools/demo_model/runs/table1 --json bench/results/demo_table1.json

Everything goes through the `musicsteer probes` commands a researcher runs (extract, train);
this script only runs them in turn (each resumes or is skipped when its output exists) and
reads their `evaluation.csv` files into one table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = {"default": [], "musicrfm": ["--no-delay", "--no-text"]}
METHODS = ("rfm", "linear", "logistic", "diffmean")
FAMILIES = ("notes", "intervals", "chords")


def musicsteer(*args: str) -> None:
    cmd = [sys.executable, "-m", "musicsteer", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def run(model: str, dataset: Path, work: Path, methods: tuple[str, ...], layouts: tuple[str, ...]) -> dict:
    results: dict = {"model": model, "dataset": str(dataset), "families": list(FAMILIES), "cells": []}
    for layout in layouts:
        features = work / f"features_{layout}"
        t0 = time.monotonic()  # a finished store is only checked; an unfinished one resumes
        musicsteer("probes", "extract", "--model", model, "--dataset", str(dataset), "--out", str(features),
                   "--no-progress", *LAYOUTS[layout])
        results[f"extract_{layout}_s"] = round(time.monotonic() - t0, 1)
        for method in methods:
            pack = work / f"pack_{layout}_{method}"
            if not (pack / "evaluation.csv").exists():
                t0 = time.monotonic()
                musicsteer("probes", "train", "--features", str(features), "--out", str(pack), "--method", method,
                           "--families", ",".join(FAMILIES), "--no-progress")
                results[f"train_{layout}_{method}_s"] = round(time.monotonic() - t0, 1)
            with open(pack / "evaluation.csv") as f:
                for row in csv.DictReader(f):
                    if row["metric"] == "accuracy":
                        results["cells"].append({"layout": layout, "method": method, "family": row["family"],
                                                 "layer": int(row["layer"]), "accuracy": float(row["score"])})
    return results


def markdown(results: dict) -> str:
    cells = results["cells"]
    layers = sorted({c["layer"] for c in cells})
    lines = ["| features | method | family | " + " | ".join(f"layer {i}" for i in layers) + " | best |",
             "|---|---|---|" + "---|" * (len(layers) + 1)]
    keys = sorted({(c["layout"], c["method"], c["family"]) for c in cells},
                  key=lambda k: (list(LAYOUTS).index(k[0]), METHODS.index(k[1]), FAMILIES.index(k[2])))
    for layout, method, family in keys:
        acc = {c["layer"]: c["accuracy"] for c in cells
               if (c["layout"], c["method"], c["family"]) == (layout, method, family)}
        lines.append(f"| {layout} | {method} | {family} | " + " | ".join(f"{acc[i]:.2f}" for i in layers) +
                     f" | {max(acc.values()):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--dataset", type=Path, required=True, help="a probes dataset with notes, intervals and chords")
    p.add_argument("--work", type=Path, required=True, help="folder for the feature stores and packs")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = run(args.model, args.dataset, args.work, tuple(args.methods.split(",")), tuple(args.layouts.split(",")))
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results | {"markdown": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
