"""`musicsteer live`: parses, checks the packages the chosen options need, delegates to
`live.session.run_live` and prints the stream's summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from .common import (
    add_model_args,
    add_sampling_args,
    add_steering_args,
    load_from_args,
    sampling_settings,
    steering_settings,
)
from .extras import STREAM, require


def register(sub) -> None:
    live = sub.add_parser("live", help="play and steer MusicGen in real time")
    add_model_args(live)
    live.add_argument("--prompt", required=True, help="the text prompt (prompt slot 1)")
    live.add_argument("--prompt-slots", type=int, default=4, metavar="N",
                      help="prompts held at once for /musicsteer/prompt/<n> and the morph (1-8; the mapping "
                           "file's prompts fill slots 2..)")
    live.add_argument("--prompt-worker", choices=("auto", "process", "thread"), default="auto",
                      help="where prompt changes are built: a child process, a thread, or auto (the process on "
                           "the CPU, the thread on CUDA); docs/prompts.md")
    out = live.add_mutually_exclusive_group()
    out.add_argument("--device", metavar="NAME", help="audio output device (default: the system's)")
    out.add_argument("--out", type=Path, metavar="FILE.wav", help="play into a WAV file in real time")
    out.add_argument("--null", nargs="?", const="realtime", choices=("realtime", "fast"),
                     help="play nowhere, paced in real time (default) or as fast as possible")
    live.add_argument("--seconds", type=float, metavar="N", help="stop after N seconds of audio")
    live.add_argument("--record", type=Path, metavar="SESSION_DIR", help="record a replayable session")
    live.add_argument("--buffer-ms", type=float, default=60.0,
                      help="audio buffered ahead of playback: lower is more responsive, higher is safer")
    live.add_argument("--window", type=float, metavar="SECONDS",
                      help="context the model sees (default 30 on a GPU, 15 on the CPU, where a step reads it)")
    live.add_argument("--keep", type=float, metavar="SECONDS",
                      help="context kept when the window rolls over (default 10 on a GPU, 5 on the CPU)")
    live.add_argument("--codec-chunk", type=int, default=1, metavar="FRAMES", help="frames per codec decode")
    live.add_argument("--codec-method", choices=("state", "window"), default="state",
                      help="streaming codec: stateful layers (default) or a window decoded per chunk")
    live.add_argument("--codec-precision", choices=("float32", "int8"), default="float32",
                      help="the stateful codec's large weights (LSTM, first transposed convolutions): float32 "
                           "(equal to an offline decode) or int8 (cheaper on CPU, about 69 dB SNR)")
    live.add_argument("--codec-threads", type=int, default=1, metavar="N", help="the stateful codec plan's threads (default 1, which holds up on a busy host; 0: every core): more read its weights faster on a quiet one")
    live.add_argument("--codec-overlap", action=argparse.BooleanOptionalAction, default=True,
                      help="the native codec decodes each frame on one thread of the next CPU decoder step while the step's other threads start it (default on; that frame's audio leaves one step later)")
    live.add_argument("--no-status", action="store_true", help="no status line")
    live.add_argument("--osc-port", type=int, default=9000, help="UDP port for OSC control (0: any free port)")
    live.add_argument("--osc-host", default="127.0.0.1", help="address OSC listens on (default loopback only)")
    live.add_argument("--osc-smooth-ms", type=float, default=0.0, help="smoothing of OSC-set numbers")
    live.add_argument("--no-osc", action="store_true", help="no OSC server")
    live.add_argument("--map", type=Path, metavar="MAPPING.toml", help="MIDI mapping file (CCs, notes, pitch bend)")
    live.add_argument("--midi-in", metavar="NAME", help="MIDI input to follow (JACK MIDI source; see midi ports)")
    live.add_argument("--midi-api", default="auto", choices=("auto", "jack", "alsa", "coremidi", "winmm"),
                      help="MIDI system: auto (JACK when a server runs, else the platform's own), jack, alsa, "
                           "coremidi or winmm")
    live.add_argument("--scenes", type=Path, metavar="SCENES.toml",
                      help="scenes file: recalled by OSC, MIDI and the web page; a store writes it")
    live.add_argument("--web", nargs="?", type=int, const=8080, metavar="PORT",
                      help="serve the browser control surface on PORT (default 8080; 0: any free port)")
    live.add_argument("--web-host", default="127.0.0.1",
                      help="address the web surface listens on (default loopback; any other needs the printed token)")
    add_sampling_args(live)
    add_steering_args(live)
    live.set_defaults(run=run_live)


def needed_packages(args: argparse.Namespace) -> tuple[str, ...]:
    """The optional packages these options use: the ring always, OSC unless --no-osc,
    PortAudio for a device, MIDI for a mapping or an input."""
    return (*STREAM, *(() if args.no_osc else ("pythonosc",)),
            *(("sounddevice",) if args.out is None and args.null is None else ()),
            *(("mido", "rtmidi") if args.map is not None or args.midi_in is not None else ()),
            *(("aiohttp",) if args.web is not None else ()))


def run_live(args: argparse.Namespace) -> int:
    require(args, *needed_packages(args))  # before the stream's modules import them
    import signal
    import threading

    from ..codec.stream import StreamingCodecSettings
    import dataclasses

    from ..live.session import LiveRequest
    from ..live.session import run_live as run_session
    from ..live.window import default_window
    from ..render import parse_assignments, parse_strengths

    settings, steering = sampling_settings(args), steering_settings(args)
    if not 1 <= args.prompt_slots <= 8:
        raise UsageError(f"--prompt-slots must be 1 to 8, got {args.prompt_slots}")
    if args.seconds is not None and not args.seconds > 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    try:
        codec = StreamingCodecSettings(chunk=args.codec_chunk, method=args.codec_method,
                                       precision=args.codec_precision, threads=args.codec_threads,
                                       overlap=args.codec_overlap)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    request = LiveRequest(
        prompt=args.prompt, sampling=settings, out=args.out, null=args.null, device=args.device,
        seconds=args.seconds, record=args.record, concepts=args.concepts, steer=parse_strengths(args.steer),
        schedules=parse_assignments(args.schedule, "--schedule"), steering=steering, buffer_ms=args.buffer_ms,
        osc_port=None if args.no_osc else args.osc_port, osc_host=args.osc_host, osc_smooth_ms=args.osc_smooth_ms,
        mapping=args.map, midi_in=args.midi_in, midi_api=args.midi_api, scenes=args.scenes,
        web_port=args.web, web_host=args.web_host,
        codec=codec, status=not args.no_status, prompt_slots=args.prompt_slots, prompt_worker=args.prompt_worker)
    model = load_from_args(args)
    window_s, keep_s = default_window(model.decoder.embed.weight.device.type, args.window, args.keep)
    request = dataclasses.replace(request, window_s=window_s, keep_s=keep_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        result = run_session(model, request, stop=stop)
    except ValueError as exc:  # stream settings that cannot work with this model
        raise UsageError(str(exc)) from exc
    st = result.stats
    print(f"played {st.audio_s:.2f} s: {st.frames} frames, {st.underruns} underruns, "
          f"median step {st.step_ms_p50:.1f} ms, {st.reprimes} re-primes"
          + (f", recorded in {args.record}" if args.record else ""))
    if st.error:
        print(f"musicsteer: error: the stream stopped: {st.error}", file=sys.stderr)
        return 1
    return 0
