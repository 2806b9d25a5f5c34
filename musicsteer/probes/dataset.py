"""Concept datasets for probe training (`musicsteer probes dataset`): the clips of
`theory` written as MIDI and rendered to audio by FluidSynth with a General MIDI
soundfont, in parallel, resumably, with a validated manifest.

Layout of a dataset directory:

  clips/<family>/<id>.wav   mono, 16-bit PCM, `sample_rate` Hz, exactly 4 s
  clips/<family>/<id>.mid   the MIDI it was rendered from
  manifest.csv              clip,family,label,value,program,seed,duration_s (one row a clip;
                            clip is relative to the directory; value is the regression
                            target, tempos' BPM, and empty for classification families)
  dataset.json              families, labels per family, programs and per_label per family,
                            seed, soundfont (path, sha256), sample rate, counts, tool
                            versions, rendering settings, "complete"

`<id>` is `<label slug>_p<program>_<index>`. Each (family, label, program) gets
`per_label` clips; their seeds walk a seeded permutation of the family's variations
(`theory.FAMILIES[family].variations`), so `per_label` = the variation count covers each root/octave/
style exactly once. The whole content of a clip follows from (family, label, program,
seed): re-rendering gives identical bytes (FluidSynth is deterministic for one build and
soundfont; it reads no user configuration here, `-f /dev/null`).

Audio: FluidSynth renders stereo float at `sample_rate` (reverb and chorus at their
defaults, gain 0.5); the two channels are averaged; the release tail is cut at 4 s with
a 10 ms cosine fade (a render shorter than 4 s is an error); the clip is then
peak-normalised to -3 dBFS, so loudness carries no label. A clip whose raw render peaks
under -80 dBFS is an error (a program without samples for those keys), not data.

Writes go to a hidden `.partial` name and are renamed into place, WAV last: a WAV under
its final name is complete. Re-running with the same seed, soundfont and sample rate
renders only what is missing; other settings in the same directory are refused.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import MusicsteerError
from . import theory
from .theory import CLIP_SECONDS, FAMILIES, FAMILY_NAMES, KEPT_PROGRAMS, RHYTHM_PROGRAMS

FORMAT = 1
COLUMNS = ("clip", "family", "label", "value", "program", "seed", "duration_s")
GAIN = 0.5
PEAK_DBFS = -3.0
SILENCE_DBFS = -80.0
FADE_S = 0.010
SOUNDFONTS = (  # looked for in this order when none is given
    "/usr/share/sounds/sf2/TimGM6mb.sf2",  # Debian timgm6mb-soundfont (SynTheory's)
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian fluid-soundfont-gm
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)
# family: (per_label, programs). With these, every count equals SynTheory's.
FULL_PRESET: dict[str, tuple[int, tuple[int, ...]]] = {
    "notes": (9, KEPT_PROGRAMS),  # 12 x 92 x 9 = 9,936 (7 octaves; 2 revisited, other articulation)
    "intervals": (36, KEPT_PROGRAMS),  # 12 x 92 x 36 = 39,744 (12 roots x up/down/harmonic)
    "scales": (24, KEPT_PROGRAMS),  # 7 x 92 x 24 = 15,456 (12 roots x up/down)
    "chords": (12, KEPT_PROGRAMS),  # 12 x 92 x 12 = 13,248 (12 roots)
    "progressions": (12, KEPT_PROGRAMS),  # 19 x 92 x 12 = 20,976 (12 keys)
    "tempos": (1, RHYTHM_PROGRAMS),  # 161 x 25 x 1 = 4,025
    "time_signatures": (6, RHYTHM_PROGRAMS),  # 8 x 25 x 6 = 1,200
}
SYNTHEORY_COUNTS = {"notes": 9936, "intervals": 39744, "scales": 15456, "chords": 13248, "progressions": 20976,
                    "tempos": 4025, "time_signatures": 1200}


class DatasetError(MusicsteerError):
    pass


@dataclass(frozen=True)
class ClipRow:
    """One manifest row, checked against dataset.json and the files on disk."""
    clip: str  # relative to the dataset directory
    family: str
    label: str
    value: float | None
    program: int
    seed: int
    duration_s: float
    path: Path  # absolute


@dataclass(frozen=True)
class ClipTask:
    """One clip to render: picklable, handed to the worker processes."""
    family: str
    label: str
    program: int
    index: int
    seed: int

    @property
    def id(self) -> str:
        return f"{theory.label_slug(self.label)}_p{self.program:03d}_{self.index:03d}"

    @property
    def wav(self) -> str:
        return f"clips/{self.family}/{self.id}.wav"

    @property
    def mid(self) -> str:
        return f"clips/{self.family}/{self.id}.mid"


@dataclass(frozen=True)
class Renderer:
    fluidsynth: str
    soundfont: str
    sample_rate: int

    @property
    def frames(self) -> int:
        return round(CLIP_SECONDS * self.sample_rate)


@dataclass(frozen=True)
class BuildReport:
    out_dir: Path
    counts: dict[str, int]  # clips per family in the manifest
    rendered: int  # clips rendered by this run
    skipped: int  # clips already complete on disk
    seconds: float
    workers: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- planning ---------------------------------------------------------------------------
def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def clip_seed(seed: int, family: str, label: str, program: int, index: int) -> int:
    """The seed of the index-th clip of (family, label, program): its residue walks a seeded
    permutation of the family's variations, its quotient is a hash (theory.make_clip)."""
    return _clip_seeds(seed, family, label, program, index + 1)[index]


def _clip_seeds(seed: int, family: str, label: str, program: int, count: int) -> list[int]:
    n = theory.variation_count(family)
    order = random.Random(_hash(seed, family, label, program)).sample(range(n), n)
    return [_hash(seed, family, label, program, i // n) * n + order[i % n] for i in range(count)]


def resolve_plan(families: Sequence[str] | None, programs: Sequence[int] | Mapping[str, Sequence[int]] | None,
                 per_label: int | Mapping[str, int]) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, int]]:
    """Families, programs per family and per_label per family, checked. `programs` and
    `per_label` may be one value for all families or a mapping by family."""
    fams = list(FAMILY_NAMES if families is None else dict.fromkeys(families))
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise DatasetError(f"unknown concept family {unknown[0]!r}; known: {', '.join(FAMILY_NAMES)}")
    if not fams:
        raise DatasetError("no concept families asked for")
    progs, per = {}, {}
    for f in fams:
        p = programs.get(f) if isinstance(programs, Mapping) else programs
        p = tuple(dict.fromkeys(KEPT_PROGRAMS if p is None else (int(x) for x in p)))
        bad = [x for x in p if not 0 <= x <= 127]
        if bad or not p:
            raise DatasetError(f"GM programs are 0..127 (got {bad[0]})" if bad else f"no programs for {f}")
        n = per_label.get(f, 1) if isinstance(per_label, Mapping) else per_label
        if int(n) < 1:
            raise DatasetError(f"per_label must be at least 1 (got {n} for {f})")
        progs[f], per[f] = p, int(n)
    return fams, progs, per


def plan_clips(families: Sequence[str], programs: Mapping[str, Sequence[int]], per_label: Mapping[str, int],
               seed: int) -> list[ClipTask]:
    """Every clip of the dataset, in manifest order: family, label, program, index."""
    return [ClipTask(f, label, p, i, s)
            for f in families for label in FAMILIES[f].labels for p in programs[f]
            for i, s in enumerate(_clip_seeds(seed, f, label, p, per_label[f]))]


def full_preset(families: Sequence[str] | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """(programs, per_label) by family reproducing SynTheory's counts (FULL_PRESET)."""
    fams = FAMILY_NAMES if families is None else families
    return {f: FULL_PRESET[f][1] for f in fams}, {f: FULL_PRESET[f][0] for f in fams}


# --- tools ------------------------------------------------------------------------------
def find_fluidsynth() -> str:
    path = shutil.which("fluidsynth")
    if path is None:
        raise DatasetError("fluidsynth is not installed: install the Debian package fluidsynth "
                           "(scripts/setup.sh does)")
    return path


def find_soundfont(soundfont: str | os.PathLike | None = None) -> Path:
    if soundfont is not None:
        path = Path(soundfont)
        if not path.is_file():
            raise DatasetError(f"soundfont {path} not found; the Debian package timgm6mb-soundfont provides "
                               f"{SOUNDFONTS[0]} (fluid-soundfont-gm a larger one)")
        with open(path, "rb") as f:
            head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            raise DatasetError(f"{path} is not a SoundFont (.sf2/.sf3 files start with RIFF....sfbk)")
        return path.resolve()
    for candidate in SOUNDFONTS:
        if Path(candidate).is_file():
            return Path(candidate).resolve()
    raise DatasetError(f"no General MIDI soundfont found; install the Debian package timgm6mb-soundfont "
                       f"(it provides {SOUNDFONTS[0]}) or pass --soundfont PATH")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tool_versions(fluidsynth: str) -> dict[str, str]:
    out = subprocess.run([fluidsynth, "--version"], capture_output=True, text=True, check=False).stdout
    first = next((line for line in out.splitlines() if "version" in line.lower()), out.strip())
    versions = {"fluidsynth": first.strip(), "python": platform.python_version(),
                "libsndfile": sf.__libsndfile_version__}
    for dist in ("musicsteer", "mido", "numpy", "soundfile"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


# --- rendering --------------------------------------------------------------------------
def render_midi(midi_path: Path, renderer: Renderer, name: str = "") -> np.ndarray:
    """FluidSynth's render of a MIDI file: mono float32, exactly the clip's frames,
    peak-normalised; DatasetError if FluidSynth fails or the render is silent."""
    raw = midi_path.with_name(f".{midi_path.stem}.raw.partial")
    # -f /dev/null: no user or system configuration; no default soundfont to fall back on
    cmd = [renderer.fluidsynth, "-f", os.devnull, "-n", "-i", "-q", "-o", f"synth.default-soundfont={os.devnull}",
           "-F", str(raw), "-T", "raw", "-O", "float", "-E", "little", "-r", str(renderer.sample_rate),
           "-g", str(GAIN), renderer.soundfont, str(midi_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        problems = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "No preset" in line]
        if proc.returncode != 0 or not raw.exists() or problems:
            why = (problems or proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise DatasetError(f"fluidsynth failed on {name or midi_path}: {why.strip()}")
        stereo = np.fromfile(raw, dtype="<f4")
    finally:
        raw.unlink(missing_ok=True)
    audio = stereo[: stereo.size // 2 * 2].reshape(-1, 2).mean(axis=1)  # (T,)
    n = renderer.frames
    if audio.size < n:  # it renders the whole MIDI file (4 s) and the release tail after it
        raise DatasetError(f"fluidsynth stopped early on {name or midi_path} ({audio.size} of {n} frames)")
    audio = audio[:n].copy()  # (n,)
    peak = float(np.abs(audio).max())
    if peak < 10 ** (SILENCE_DBFS / 20):
        raise DatasetError(f"{name or midi_path} rendered silent (peak {peak:.1e}): the soundfont has no "
                           "samples for these keys on this program")
    fade = round(FADE_S * renderer.sample_rate)
    audio[n - fade:] *= 0.5 * (1 + np.cos(np.linspace(0, math.pi, fade)))
    return (audio * (10 ** (PEAK_DBFS / 20) / peak)).astype(np.float32)


def render_task(task: ClipTask, out_dir: Path, renderer: Renderer) -> None:
    """Writes one clip's MIDI and WAV under out_dir (each to a .partial name, then renamed)."""
    clip = theory.make_clip(task.family, task.label, task.program, task.seed)
    mid, wav = out_dir / task.mid, out_dir / task.wav
    mid.parent.mkdir(parents=True, exist_ok=True)
    tmp_mid = mid.with_name(f".{mid.name}.partial")
    theory.to_midi(clip).save(tmp_mid)
    os.replace(tmp_mid, mid)
    audio = render_midi(mid, renderer, name=task.wav)
    tmp_wav = wav.with_name(f".{wav.name}.partial")
    sf.write(tmp_wav, audio, renderer.sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp_wav, wav)


def is_complete(out_dir: Path, task: ClipTask, renderer: Renderer) -> bool:
    wav = out_dir / task.wav
    if not wav.is_file() or not (out_dir / task.mid).is_file():
        return False
    try:
        info = sf.info(wav)
    except RuntimeError:
        return False
    return info.frames == renderer.frames and info.samplerate == renderer.sample_rate and info.channels == 1


# --- building ---------------------------------------------------------------------------
def build_dataset(out_dir: str | os.PathLike, families: Sequence[str] | None = None,
                  programs: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                  per_label: int | Mapping[str, int] = 1, seed: int = 0,
                  soundfont: str | os.PathLike | None = None, sample_rate: int = 32000,
                  workers: int | None = None, progress: bool = True, render_all=None) -> BuildReport:
    """Renders the dataset into out_dir (resuming: complete clips are kept) and writes
    manifest.csv and dataset.json. families None: all; programs None: the 92 kept ones;
    programs and per_label may be given per family (see full_preset). `render_all(todo,
    out, renderer, progress)` replaces the local process pool (the Ray engine's)."""
    started = time.perf_counter()
    fams, progs, per = resolve_plan(families, programs, per_label)
    if not 8000 <= int(sample_rate) <= 96000:
        raise DatasetError(f"sample rate {sample_rate} is outside FluidSynth's 8000..96000 Hz")
    if seed < 0:
        raise DatasetError(f"seed must not be negative (got {seed})")
    workers = max(1, int(workers or os.cpu_count() or 1))
    fluidsynth = find_fluidsynth()
    sf_path = find_soundfont(soundfont)
    renderer = Renderer(fluidsynth, str(sf_path), int(sample_rate))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT, "families": fams, "labels": {f: list(FAMILIES[f].labels) for f in fams},
        "targets": {f: FAMILIES[f].target for f in fams if FAMILIES[f].regression},
        "programs": {f: list(progs[f]) for f in fams}, "per_label": per, "seed": seed,
        "soundfont": str(sf_path), "soundfont_sha256": _sha256(sf_path), "sample_rate": renderer.sample_rate,
        "clip_seconds": CLIP_SECONDS, "channels": 1, "subtype": "PCM_16",
        "rendering": {"gain": GAIN, "peak_dbfs": PEAK_DBFS, "silence_dbfs": SILENCE_DBFS, "fade_s": FADE_S,
                      "reverb": "fluidsynth default", "chorus": "fluidsynth default"},
    }
    _check_resumable(out, info)
    _write_json(out / "dataset.json", {**info, "complete": False})
    for stale in out.glob("clips/*/.*.partial"):
        stale.unlink()

    tasks = plan_clips(fams, progs, per, seed)
    todo = [t for t in tasks if not is_complete(out, t, renderer)]
    if render_all is None:
        _render_all(todo, out, renderer, workers, progress)
    else:
        render_all(todo, out, renderer, progress)

    counts = {f: 0 for f in fams}
    for t in tasks:
        counts[t.family] += 1
    _write_manifest(out, tasks)
    _write_json(out / "dataset.json", {**info, "counts": {**counts, "total": len(tasks)},
                                       "tools": tool_versions(fluidsynth), "complete": True})
    return BuildReport(out, counts, len(todo), len(tasks) - len(todo), time.perf_counter() - started, workers)


def _render_all(todo: list[ClipTask], out: Path, renderer: Renderer, workers: int, progress: bool) -> None:
    """Renders in `workers` processes, keeping a few clips per worker in flight: Ctrl-C or a
    failing clip stops the run after at most those."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="clip", desc="render", disable=None if progress else True)
    try:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                render_task(task, out, renderer)
                bar.update()
            return
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context(),
                                   initializer=_ignore_sigint)
        pending, queue = set(), iter(todo)
        try:
            while True:
                for task in itertools.islice(queue, 4 * workers - len(pending)):
                    pending.add(pool.submit(render_task, task, out, renderer))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a worker's DatasetError is raised here
                    bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    finally:
        bar.close()


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which cancels what is queued and lets running
    clips finish (their files are written under .partial names until complete)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mp_context():
    """fork on Linux: workers need nothing the parent's threads hold, and spawn/forkserver would
    re-run an unguarded __main__ (`python -m musicsteer`); spawn elsewhere."""
    return get_context("fork" if sys.platform == "linux" else "spawn")


def _check_resumable(out: Path, info: dict) -> None:
    path = out / "dataset.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is unreadable ({exc}); use another output directory") from exc
    for key in ("format", "seed", "sample_rate", "soundfont_sha256", "clip_seconds"):
        if old.get(key) != info[key]:
            raise DatasetError(f"{out} holds a dataset built with another {key} ({old.get(key)!r}, now "
                               f"{info[key]!r}); use another output directory")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write_manifest(out: Path, tasks: list[ClipTask]) -> None:
    tmp = out / ".manifest.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for t in tasks:
            target = FAMILIES[t.family].regression
            w.writerow([t.wav, t.family, t.label, repr(float(t.label)) if target else "", t.program, t.seed,
                        repr(CLIP_SECONDS)])
    os.replace(tmp, out / "manifest.csv")


# --- reading ----------------------------------------------------------------------------
def load_info(directory: str | os.PathLike) -> dict:
    """dataset.json of a dataset directory."""
    path = Path(directory) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{Path(directory)} is not a concept dataset: dataset.json is missing "
                           "(make one with `musicsteer probes dataset`)")
    try:
        info = json.loads(path.read_text())
        labels = info["labels"]
        if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
            raise TypeError("labels must map each family to a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a readable dataset description ({exc})") from exc
    return info


def load_manifest(directory: str | os.PathLike) -> list[ClipRow]:
    """The manifest's rows, each checked: known family, label in dataset.json's list for its
    family, numbers where numbers belong, and the clip's file present."""
    d = Path(directory)
    info = load_info(d)
    labels = {f: set(v) for f, v in info["labels"].items()}
    targets = info.get("targets", {})
    path = d / "manifest.csv"
    if not info.get("complete", False) or not path.is_file():
        raise DatasetError(f"{path} is missing: the build did not finish (run `musicsteer probes dataset` "
                           "again with the same --out to resume)")
    rows = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
            for line, r in enumerate(reader, start=2):
                rows.append(_row(d, f"{path}:{line}", r, labels, targets))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    return rows


def _row(d: Path, where: str, r: dict, labels: dict[str, set], targets: dict) -> ClipRow:
    family, label, clip = (r.get("family") or "").strip(), (r.get("label") or "").strip(), r.get("clip") or ""
    if family not in labels:
        raise DatasetError(f"{where}: unknown family {family!r} (dataset.json has {', '.join(sorted(labels))})")
    if label not in labels[family]:
        raise DatasetError(f"{where}: label {label!r} is not one of dataset.json's labels for {family}")
    try:
        value = float(r["value"]) if (r.get("value") or "").strip() else None
        program, seed, duration = int(r["program"]), int(r["seed"]), float(r["duration_s"])
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: value, program, seed and duration_s must be numbers "
                           f"(got {r.get('value')!r}, {r.get('program')!r}, {r.get('seed')!r}, "
                           f"{r.get('duration_s')!r})") from None
    if (value is None) == (family in targets):
        raise DatasetError(f"{where}: {family} is a {'regression' if family in targets else 'classification'} "
                           f"family, so value must be {'a number' if family in targets else 'empty'}")
    if not 0 <= program <= 127:
        raise DatasetError(f"{where}: program {program} is outside 0..127")
    rel = Path(clip)
    if not clip or rel.is_absolute() or ".." in rel.parts:
        raise DatasetError(f"{where}: clip {clip!r} must be a path inside the dataset directory")
    full = d / rel
    if not full.is_file():
        raise DatasetError(f"{where}: {clip} is missing")
    return ClipRow(clip, family, label, value, program, seed, duration, full.resolve())
