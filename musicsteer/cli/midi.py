"""`musicsteer midi ports` and `musicsteer midi learn`: list MIDI inputs, bind a knob by moving it.

It parses and delegates to midi.py; user errors are MusicsteerError subclasses (one line,
exit status 2). `register(subparsers)` adds the `midi` command to the main parser.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..controllers.mapping import CURVES, TAKEOVERS, Mapping, format_table
from ..controllers.state import ControlState
from .extras import require


def register(subparsers) -> None:
    midi = subparsers.add_parser("midi", help="MIDI inputs and MIDI learn (MIDI goes through JACK)")
    msub = midi.add_subparsers(dest="midi_command", required=True)
    ports = msub.add_parser("ports", help="list the MIDI inputs (JACK MIDI sources)")
    ports.set_defaults(run=run_ports)

    learn = msub.add_parser("learn", help="bind the next knob moved to a parameter, in a mapping file")
    learn.add_argument("--map", type=Path, required=True, metavar="FILE",
                       help="the mapping file to write the binding into (created if missing)")
    learn.add_argument("--param", required=True,
                       help="concept/NAME/strength, cfg, temperature, topk, topp or prompt_slot")
    learn.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"),
                       help="values at the knob's ends (default: the parameter's usual range)")
    learn.add_argument("--curve", default="linear", choices=tuple(CURVES), help="default linear")
    learn.add_argument("--shape", type=float, help="steepness of exp, log (default 4) and s (default 2) curves")
    learn.add_argument("--takeover", default="pickup", choices=TAKEOVERS,
                       help="pickup (default): the knob acts once it passes the current value; jump: at once")
    learn.add_argument("--smooth-ms", type=float, default=0.0, metavar="N", help="smoothing time constant (0)")
    learn.add_argument("--bits", type=int, choices=(7, 14),
                       help="force a 7-bit or 14-bit binding (default: 14-bit when an LSB follows the MSB)")
    learn.add_argument("--any-channel", action="store_true", help="listen on every channel, not the knob's")
    learn.add_argument("--port", metavar="NAME", help="also listen to the MIDI input whose name contains NAME")
    learn.add_argument("--client-name", default="musicsteer", metavar="NAME",
                       help="JACK client name; the input is NAME:in (default musicsteer)")
    learn.add_argument("--concepts", type=Path, metavar="PACK", help="check concept names against this pack")
    learn.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (30)")
    learn.set_defaults(run=run_learn)


def _input_ports() -> list[str]:
    from ..controllers.midi import list_input_ports, quiet_stderr

    with quiet_stderr():
        return list_input_ports()


def run_ports(args) -> int:
    require(args, "mido", "rtmidi")
    names = _input_ports()
    for name in names:
        print(name)
    if not names:
        print("no MIDI inputs on JACK (connect a controller, or start a2jmidid -e to bridge ALSA MIDI)",
              file=sys.stderr)
    return 0


def run_learn(args) -> int:
    require(args, "mido", "rtmidi")
    from ..controllers.midi import MidiController, MidiError, MidiLearner, describe  # mido, at its top

    concepts = None
    if args.concepts is not None:
        from ..steering.pack import ConceptPack

        concepts = ConceptPack.load(args.concepts).names
    mapping = Mapping.load(args.map, concepts) if args.map.exists() else Mapping(path=args.map)
    learner = MidiLearner(args.map, concepts)
    learner.arm(args.param, range=args.range, curve=args.curve, shape=args.shape, takeover=args.takeover,
                smooth_ms=args.smooth_ms, bits=args.bits, any_channel=args.any_channel)  # bad options end here
    _input_ports()  # a JACK that is not running is one line, not libjack's chatter
    with MidiController(ControlState(concepts), mapping, args.port, args.client_name) as controller:
        controller.attach_learner(learner)
        where = controller.virtual_port + (f" and {args.port!r}" if args.port else "")
        print(f"move a knob for {args.param} (listening on {where})", file=sys.stderr, flush=True)
        try:
            binding = learner.wait(args.timeout)
        except MidiError as exc:
            if learner.error is not None:
                raise
            raise MidiError(f"{exc} on {where}; connect a controller or pass --port NAME") from None
    print(f"learned {describe(binding)}; wrote {args.map}")
    print(format_table("cc", binding.to_table()), end="")
    return 0
