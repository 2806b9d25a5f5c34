"""Models that ship inside the package: `--model demo` and its concept packs.

`demo/` is a transformers MusicGen directory (config.json, model.safetensors, tokenizer
files) trained on this project's own FluidSynth clips by tools/demo_model/ (a small codec
and decoder; docs/demo_model.md). Beside it, two packs of note, interval and chord
directions learned on its hidden states: `--concepts demo` (ridge probes: the ones that
steered best on this model, measured in docs/demo_model.md) and `--concepts demo-rfm`
(Recursive Feature Machines). These names resolve before directories.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
EMBEDDED = {"demo": HERE / "demo"}
PACKS = {"demo": HERE / "demo" / "concepts", "demo-rfm": HERE / "demo" / "concepts_rfm"}


def embedded_model(name: str) -> Path | None:
    """The directory of the shipped model `name`, or None when `name` is not one."""
    path = EMBEDDED.get(name)
    return path if path is not None and (path / "config.json").exists() else None


def embedded_pack(name) -> Path | None:
    """The shipped pack `name` (`--concepts demo`, `--concepts demo-rfm`), or None."""
    path = PACKS.get(str(name))
    return path if path is not None and (path / "concepts.json").exists() else None
