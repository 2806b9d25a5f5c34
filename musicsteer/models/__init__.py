"""Models that ship inside the package: `--model demo` and its concept pack `--concepts demo`.

`demo/` is a transformers MusicGen directory (config.json, model.safetensors, tokenizer
files) trained on this project's own FluidSynth clips by tools/demo_model/ (a small codec
and decoder; docs/demo_model.md), and `demo/concepts/` the pack of note and chord
directions learned on it. Names here resolve before presets and directories.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
EMBEDDED = {"demo": HERE / "demo"}


def embedded_model(name: str) -> Path | None:
    """The directory of the shipped model `name`, or None when `name` is not one."""
    path = EMBEDDED.get(name)
    return path if path is not None and (path / "config.json").exists() else None


def embedded_pack(name: str) -> Path | None:
    """The concept pack shipped beside the model `name` (`--concepts demo`), or None."""
    path = EMBEDDED.get(str(name))
    return path / "concepts" if path is not None and (path / "concepts" / "concepts.json").exists() else None
