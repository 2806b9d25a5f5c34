"""The packages only some commands need, and the one-line error when one is missing.

torch, numpy, transformers (with its own tqdm and pyyaml), safetensors and sentencepiece
are what every command needs; `render`, `bench latency` and `bench codec` need nothing
else. Each other command calls `require` with what it imports before it does any work,
so that a missing package is one line naming all of them, not a traceback halfway through.
"""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import MissingPackageError

# import name -> the distribution pip installs it from
PACKAGES = {
    "mido": "mido",
    "rtmidi": "python-rtmidi",
    "soundfile": "soundfile",
    "pythonosc": "python-osc",
    "xrfm": "xrfm",
    "rtmixer": "rtmixer",
    "_rtmixer": "rtmixer",
    "pa_ringbuffer": "pa-ringbuffer",
    "sounddevice": "sounddevice",
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "aiohttp": "aiohttp",
}

# what the live stream needs whatever its options: the C ring buffer it plays through
STREAM = ("pa_ringbuffer", "rtmixer")


def command_name(args: argparse.Namespace) -> str:
    """`probes dataset`, `bench latency`, `render`: the command the arguments ran."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def require(args: argparse.Namespace, *modules: str) -> None:
    """Raise MissingPackageError naming every one of `modules` that cannot be imported."""
    missing = [PACKAGES[m] for m in modules if not importable(m)]
    if missing:
        raise MissingPackageError(command_name(args), list(dict.fromkeys(missing)))


def importable(module: str) -> bool:
    """Whether `import module` would find it, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the name: as good as absent
        return False


def missing_package(args: argparse.Namespace, exc: ImportError) -> MissingPackageError | None:
    """The one-line error for an ImportError of a known optional package; None for any other."""
    package = PACKAGES.get((exc.name or "").partition(".")[0])
    return MissingPackageError(command_name(args), [package]) if package else None
