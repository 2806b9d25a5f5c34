"""The `musicsteer` command line. It parses and delegates; user errors become one
line on stderr and a non-zero exit, never a traceback.

Each command group is a module here with `register(subparsers)` and its `run_…`
functions; those import what the command needs when it runs, so that building the
parser imports no model code and no optional package (cli/extras.py says which
commands need which).
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import MusicsteerError
from . import bench, concepts, live, midi, probes, render
from .extras import missing_package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsteer", description="Play MusicGen live while steering it.")
    parser.add_argument("--version", action="version", version=f"musicsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (render, live, midi, probes, concepts, bench):
        group.register(sub)
    return parser


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would drown the one-line messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(exc: MusicsteerError) -> int:
    print(f"musicsteer: error: {exc}", file=sys.stderr)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.run(args)
    except ImportError as exc:  # an optional package no `require` named: still one line
        missing = missing_package(args, exc)
        if missing is None:
            raise
        return _fail(missing)
    except MusicsteerError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("musicsteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
