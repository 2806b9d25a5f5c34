"""The music theory of the concept datasets: concept families, their labels, and the
notes of one clip, after SynTheory (Wei et al. 2024).

A clip is a function of (family, label, program, seed) and nothing else:

- `seed % variation_count(family)` picks the clip's variation (its root or key, octave,
  play style, reverb level: `FAMILIES[family].variations` lists them), so a label is never tied to
  one absolute pitch; only in `notes` is the pitch class itself the label.
- `seed // variation_count(family)` seeds the articulation of pitched families (velocity
  and how much of its slot each note sounds), which leaves the label untouched.

Clips last `CLIP_SECONDS` (4 s): 8 beats at 120 BPM; `tempos` changes the BPM and keeps
the length. Families and their labels:

  notes            12 pitch classes, C .. B (sharps); octaves 1..7 (C1 .. B7) are variations
  intervals        m2 M2 m3 M3 P4 TT P5 m6 M6 m7 M7 P8; played up, down or together
  scales           the 7 diatonic modes, ionian .. locrian; played up or down, tonic to octave
  chords           {major, minor, augmented, diminished}/{root, first, second} (inversion)
  progressions     SynTheory's 19: 10 major and 9 minor, named by roman numerals,
                   e.g. major/I-V-vi-IV, minor/i-VI-VII-i ("o" marks a diminished triad)
  tempos           "50" .. "210" BPM (161 labels); the BPM is the regression target
  time_signatures  SynTheory's 8: 2/2 2/4 3/4 3/8 4/4 6/8 9/8 12/8

Rhythm (tempos, time signatures) is made audible as a metronome played twice: the
clip's program plays a short note on every pulse (an octave higher on each bar's
downbeat), doubled by a GM drum-kit wood block on channel 10 (hi block on the downbeat,
low block elsewhere), so the pulse is clear even with slow-attack programs. Accents
have three levels: the downbeat (velocity 120), the beats of a compound meter and the
third beat of 4/4 (96), the rest (72). Compound meters (6/8, 9/8, 12/8, and 3/8)
pulse in eighths; simple meters pulse on their denominator (2/2 in halves). As in
SynTheory, time signatures play at 120 quarter notes per minute, from a downbeat; tempos
pulse in quarter notes with 4/4's accents. Their variations add a reverb send level
(CC91 0, 63 or 127) to the pulse note's pitch class.

This module knows nothing of files, soundfonts or audio: `to_midi` gives a mido file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mido

CLIP_SECONDS = 4.0
BASE_BPM = 120
TICKS_PER_BEAT = 480
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DRUM_CHANNEL = 9  # General MIDI channel 10
PITCHED_CHANNEL = 0

# --- General MIDI programs --------------------------------------------------------------
# SynTheory's 92 programs: all 128 less 36 dropped ones.
DROPPED_PROGRAMS = {
    # effect-like: Synth Effects (96-103) and Sound Effects (112-127: tinkle bell, agogo,
    # steel drums, woodblock, taiko, melodic tom, synth drum, reverse cymbal, fret noise,
    # breath, seashore, bird, telephone, helicopter, applause, gunshot)
    **{p: "effect" for p in (*range(96, 104), *range(112, 128))},
    # strong overtones that blur the pitch: celesta, glockenspiel, tubular bells,
    # accordion, tango accordion, timpani, fifths lead
    **{p: "overtones" for p in (8, 9, 14, 21, 23, 47, 86)},
    # very expressive: harmonica, guitar harmonics, orchestra hit, shakuhachi, whistle
    **{p: "expressive" for p in (22, 31, 55, 77, 78)},
}
KEPT_PROGRAMS: tuple[int, ...] = tuple(p for p in range(128) if p not in DROPPED_PROGRAMS)
# 25 kept programs with a clear attack, for the rhythm families of the full preset
# (pianos, harpsichord, clavinet, music box, vibraphone, marimba, xylophone, dulcimer,
# guitars, basses, pizzicato strings, harp, sitar, banjo, koto).
RHYTHM_PROGRAMS: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 7, 10, 11, 12, 13, 15, 24, 25, 26, 27, 28, 32, 33, 36,
                                    45, 46, 104, 105, 107)
# Keys each program sounds on in TimGM6mb (measured: a note outside them renders silent).
# Clips are moved by whole octaves into the range; labels never depend on the octave.
DEFAULT_RANGE = (12, 108)
PROGRAM_RANGES = {54: (12, 92), 67: (12, 79), 68: (36, 108)}

# --- labels -----------------------------------------------------------------------------
INTERVALS = ("m2", "M2", "m3", "M3", "P4", "TT", "P5", "m6", "M6", "m7", "M7", "P8")
INTERVAL_SEMITONES = {name: i + 1 for i, name in enumerate(INTERVALS)}
MODES = ("ionian", "dorian", "phrygian", "lydian", "mixolydian", "aeolian", "locrian")
_IONIAN_STEPS = (2, 2, 1, 2, 2, 2, 1)
MODE_STEPS = {m: _IONIAN_STEPS[i:] + _IONIAN_STEPS[:i] for i, m in enumerate(MODES)}
TRIADS = {"major": (4, 7), "minor": (3, 7), "augmented": (4, 8), "diminished": (3, 6)}
INVERSIONS = ("root", "first", "second")
CHORDS = tuple(f"{kind}/{inv}" for kind in TRIADS for inv in INVERSIONS)
# SynTheory's progressions: (mode, scale degrees), one chord per 2 beats.
PROGRESSION_DEGREES = (
    ("ionian", (1, 4, 5, 1)), ("ionian", (1, 4, 6, 5)), ("ionian", (1, 5, 6, 4)), ("ionian", (1, 6, 4, 5)),
    ("ionian", (2, 5, 1, 6)), ("ionian", (4, 1, 5, 6)), ("ionian", (4, 5, 3, 6)), ("ionian", (5, 4, 1, 5)),
    ("ionian", (5, 6, 4, 1)), ("ionian", (6, 4, 1, 5)),
    ("aeolian", (1, 2, 5, 1)), ("aeolian", (1, 3, 4, 1)), ("aeolian", (1, 4, 5, 1)), ("aeolian", (1, 6, 3, 7)),
    ("aeolian", (1, 6, 7, 1)), ("aeolian", (1, 6, 7, 3)), ("aeolian", (1, 7, 6, 4)), ("aeolian", (4, 7, 1, 1)),
    ("aeolian", (7, 6, 7, 1)),
)
TEMPOS = tuple(range(50, 211))
TIME_SIGNATURES = ((2, 2), (2, 4), (3, 4), (3, 8), (4, 4), (6, 8), (9, 8), (12, 8))
REVERB_LEVELS = (0, 63, 127)
STRONG, MEDIUM, WEAK = 2, 1, 0
ACCENT_VELOCITY = {STRONG: 120, MEDIUM: 96, WEAK: 72}
ACCENT_DRUM = {STRONG: 76, MEDIUM: 77, WEAK: 77}  # hi / low wood block
_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")


# --- values -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Note:
    start: float  # beats (quarter notes) from the clip's start
    end: float
    pitch: int  # MIDI note
    velocity: int
    channel: int = PITCHED_CHANNEL


@dataclass(frozen=True)
class Variation:
    """What varies between clips of one label: never the label itself."""
    root: int = 0  # pitch class of the root, key or pulse note
    octave: int = 4  # scientific octave (C4 = MIDI 60)
    style: str = ""  # intervals: up/down/harmonic; scales: up/down
    reverb: int | None = None  # CC91 send, rhythm families


@dataclass(frozen=True)
class Family:
    name: str
    labels: tuple[str, ...]
    variations: tuple[Variation, ...]
    target: str | None = None  # the regression target's name; None for a classification family

    @property
    def regression(self) -> bool:
        return self.target is not None


@dataclass(frozen=True)
class Clip:
    family: str
    label: str
    program: int
    seed: int
    variation: Variation
    bpm: float
    time_signature: tuple[int, int]
    notes: tuple[Note, ...]
    reverb: int | None = None
    value: float | None = None  # the regression target, if the family has one

    @property
    def beats(self) -> float:
        """The clip's length in beats."""
        return CLIP_SECONDS * self.bpm / 60.0

    def seconds(self, beat: float) -> float:
        return beat * 60.0 / self.bpm

    def pitched(self) -> tuple[Note, ...]:
        return tuple(n for n in self.notes if n.channel != DRUM_CHANNEL)


# --- theory helpers ---------------------------------------------------------------------
def scale_offsets(mode: str) -> tuple[int, ...]:
    """Semitones above the tonic of the mode's 7 degrees, e.g. ionian (0, 2, 4, 5, 7, 9, 11)."""
    steps = MODE_STEPS[mode]
    return tuple(sum(steps[:i]) for i in range(7))


def triad(root: int, kind: str, inversion: str = "root") -> tuple[int, ...]:
    """MIDI notes of a triad on `root`, lowest first: first inversion puts the third in the
    bass (root an octave up), second inversion the fifth (root and third an octave up)."""
    third, fifth = TRIADS[kind]
    tones = [root, root + third, root + fifth]
    for _ in range(INVERSIONS.index(inversion)):
        tones.append(tones.pop(0) + 12)
    return tuple(tones)


def diatonic_triad(tonic: int, mode: str, degree: int) -> tuple[int, int, int]:
    """The root-position triad on a scale degree (1-7), stacked in thirds within the mode."""
    offs = scale_offsets(mode)

    def tone(i: int) -> int:
        octave, d = divmod(degree - 1 + i, 7)
        return tonic + offs[d] + 12 * octave

    return tone(0), tone(2), tone(4)


def triad_kind(notes: tuple[int, ...]) -> str:
    """The quality of a root-position triad."""
    shape = (notes[1] - notes[0], notes[2] - notes[0])
    for kind, intervals in TRIADS.items():
        if shape == intervals:
            return kind
    raise ValueError(f"{notes} is not a root-position triad")


def numeral(mode: str, degree: int) -> str:
    """Roman numeral of the diatonic triad: upper case major, lower case minor, 'o' diminished, '+' augmented."""
    kind = triad_kind(diatonic_triad(0, mode, degree))
    roman = _ROMAN[degree - 1]
    return {"major": roman, "minor": roman.lower(), "diminished": roman.lower() + "o", "augmented": roman + "+"}[kind]


def progression_label(mode: str, degrees: tuple[int, ...]) -> str:
    return ("major/" if mode == "ionian" else "minor/") + "-".join(numeral(mode, d) for d in degrees)


PROGRESSIONS = {progression_label(m, d): (m, d) for m, d in PROGRESSION_DEGREES}


def is_compound(ts: tuple[int, int]) -> bool:
    """Eighth-note meters whose beats group in threes (3/8, 6/8, 9/8, 12/8), as SynTheory."""
    return ts[0] % 3 == 0 and ts[1] == 8


def pulse_beats(ts: tuple[int, int]) -> float:
    """Quarter-note beats between two metronome pulses."""
    return 0.5 if is_compound(ts) else 4.0 / ts[1]


def accent_pattern(ts: tuple[int, int]) -> tuple[int, ...]:
    """Accent level (STRONG, MEDIUM, WEAK) of each pulse in one bar."""
    num = ts[0]
    levels = [WEAK] * num
    if is_compound(ts):
        for i in range(0, num, 3):
            levels[i] = MEDIUM
    elif num == 4:
        levels[2] = MEDIUM
    levels[0] = STRONG
    return tuple(levels)


def time_signature_label(ts: tuple[int, int]) -> str:
    return f"{ts[0]}/{ts[1]}"


def parse_time_signature(label: str) -> tuple[int, int]:
    num, den = label.split("/")
    return int(num), int(den)


def label_slug(label: str) -> str:
    """A file-name-safe form of a label: 'major/first' -> 'major-first', 'C#' -> 'Cs'."""
    return label.replace("/", "-").replace("#", "s").replace("+", "aug")


# --- families ---------------------------------------------------------------------------
def _roots_x(styles) -> tuple[Variation, ...]:
    return tuple(Variation(root=r, style=s) for r in range(12) for s in styles)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("notes", PITCH_CLASSES, tuple(Variation(octave=o) for o in range(1, 8))),
        Family("intervals", INTERVALS, _roots_x(("up", "down", "harmonic"))),
        Family("scales", MODES, _roots_x(("up", "down"))),
        Family("chords", CHORDS, _roots_x(("",))),
        Family("progressions", tuple(PROGRESSIONS), _roots_x(("",))),
        Family("tempos", tuple(str(b) for b in TEMPOS),
               tuple(Variation(root=r, reverb=v) for r in range(12) for v in REVERB_LEVELS), target="bpm"),
        Family("time_signatures", tuple(time_signature_label(t) for t in TIME_SIGNATURES),
               tuple(Variation(root=r, reverb=v) for r in range(12) for v in REVERB_LEVELS)),
    )
}
FAMILY_NAMES = tuple(FAMILIES)


def variation_count(family: str) -> int:
    return len(FAMILIES[family].variations)


def variation_of(family: str, seed: int) -> Variation:
    fam = FAMILIES[family]
    return fam.variations[seed % len(fam.variations)]


# --- clips ------------------------------------------------------------------------------
def make_clip(family: str, label: str, program: int, seed: int) -> Clip:
    """The notes of one clip. Raises ValueError for an unknown family, label or program."""
    if family not in FAMILIES:
        raise ValueError(f"unknown concept family {family!r}; known: {', '.join(FAMILY_NAMES)}")
    fam = FAMILIES[family]
    if label not in fam.labels:
        raise ValueError(f"{label!r} is not a label of {family}")
    if not 0 <= program <= 127:
        raise ValueError(f"GM program {program} is outside 0..127")
    if seed < 0:
        raise ValueError(f"seed {seed} is negative")
    var = variation_of(family, seed)
    rng = random.Random(seed // len(fam.variations))
    bpm, ts, value = float(BASE_BPM), (4, 4), None
    if family == "notes":
        notes = _repeat([12 * (var.octave + 1) + PITCH_CLASSES.index(label)], 4, 2.0, rng)
    elif family == "intervals":
        low = 60 + var.root
        high = low + INTERVAL_SEMITONES[label]
        if var.style == "harmonic":
            notes = _repeat([low, high], 8, 1.0, rng)
        else:
            pair = (low, high) if var.style == "up" else (high, low)
            notes = _sequence([pair[i % 2] for i in range(8)], 1.0, rng)
    elif family == "scales":
        tonic = 60 + var.root
        pitches = [tonic + o for o in scale_offsets(label)] + [tonic + 12]
        notes = _sequence(pitches if var.style == "up" else pitches[::-1], 1.0, rng)
    elif family == "chords":
        kind, inversion = label.split("/")
        notes = _repeat(list(triad(60 + var.root, kind, inversion)), 4, 2.0, rng)
    elif family == "progressions":
        mode, degrees = PROGRESSIONS[label]
        chords = [diatonic_triad(60 + var.root, mode, d) for d in degrees]
        notes = _chord_sequence(chords, 2.0, rng)
    elif family == "tempos":
        bpm, value = float(label), float(label)
        notes = _metronome(ts, bpm, 60 + var.root)
    else:  # time_signatures
        ts = parse_time_signature(label)
        notes = _metronome(ts, bpm, 60 + var.root)
    notes = _fit_register(notes, program)
    return Clip(family, label, program, seed, var, bpm, ts, tuple(notes), var.reverb, value)


def _articulation(rng: random.Random) -> tuple[int, float]:
    return rng.randint(64, 100), rng.uniform(0.8, 1.0)  # velocity, fraction of the slot sounding


def _repeat(chord: list[int], times: int, length: float, rng: random.Random) -> list[Note]:
    vel, legato = _articulation(rng)
    return [Note(i * length, i * length + legato * length, p, vel) for i in range(times) for p in chord]


def _sequence(pitches: list[int], length: float, rng: random.Random) -> list[Note]:
    vel, legato = _articulation(rng)
    return [Note(i * length, i * length + legato * length, p, vel) for i, p in enumerate(pitches)]


def _chord_sequence(chords: list[tuple[int, ...]], length: float, rng: random.Random) -> list[Note]:
    vel, legato = _articulation(rng)
    return [Note(i * length, i * length + legato * length, p, vel) for i, c in enumerate(chords) for p in c]


def _metronome(ts: tuple[int, int], bpm: float, root: int) -> list[Note]:
    """A pulse on the program (octave up on downbeats) doubled by a drum-kit wood block."""
    step, pattern = pulse_beats(ts), accent_pattern(ts)
    total = CLIP_SECONDS * bpm / 60.0
    notes = []
    k = 0
    while k * step < total - 1e-9:
        level = pattern[k % len(pattern)]
        start, end = k * step, min(k * step + step / 2, total)
        vel = ACCENT_VELOCITY[level]
        notes.append(Note(start, end, root + (12 if level == STRONG else 0), vel))
        notes.append(Note(start, end, ACCENT_DRUM[level], vel, DRUM_CHANNEL))
        k += 1
    return notes


def _fit_register(notes: list[Note], program: int) -> list[Note]:
    """Move the pitched notes by whole octaves into the keys the program sounds on."""
    lo, hi = PROGRAM_RANGES.get(program, DEFAULT_RANGE)
    pitches = [n.pitch for n in notes if n.channel != DRUM_CHANNEL]
    shift = 0
    while max(pitches) + shift > hi:
        shift -= 12
    while min(pitches) + shift < lo:
        shift += 12
    if max(pitches) + shift > hi:
        raise ValueError(f"notes {min(pitches)}..{max(pitches)} do not fit program {program}'s keys {lo}..{hi}")
    if not shift:
        return notes
    return [n if n.channel == DRUM_CHANNEL else Note(n.start, n.end, n.pitch + shift, n.velocity, n.channel)
            for n in notes]


# --- MIDI -------------------------------------------------------------------------------
def to_midi(clip: Clip) -> mido.MidiFile:
    """A type-0 MIDI file of the clip: tempo, time signature, program, reverb, notes, and
    the end of track exactly at the clip's end."""
    import mido  # here, not at the top: the CLI's parser reads this module's tables

    events: list[tuple[int, int, mido.Message]] = []  # (tick, order: offs before ons, message)
    for n in clip.notes:
        on, off = _tick(n.start), _tick(n.end)
        events.append((on, 1, mido.Message("note_on", note=n.pitch, velocity=n.velocity, channel=n.channel)))
        events.append((off, 0, mido.Message("note_off", note=n.pitch, velocity=0, channel=n.channel)))
    events.sort(key=lambda e: (e[0], e[1]))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("track_name", name=f"{clip.family} {clip.label}"))
    num, den = clip.time_signature
    track.append(mido.MetaMessage("time_signature", numerator=num, denominator=den))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(clip.bpm)))
    track.append(mido.Message("program_change", program=clip.program, channel=PITCHED_CHANNEL))
    if clip.reverb is not None:
        for ch in sorted({n.channel for n in clip.notes}):
            track.append(mido.Message("control_change", control=91, value=clip.reverb, channel=ch))
    now = 0
    for tick, _, msg in events:
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=max(0, _tick(clip.beats) - now)))
    midi = mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_BEAT)
    midi.tracks.append(track)
    return midi


def _tick(beat: float) -> int:
    return round(beat * TICKS_PER_BEAT)
