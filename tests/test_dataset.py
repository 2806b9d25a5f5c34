"""Concept datasets: the theory of each family (exact MIDI content), and a tiny build
rendered by the real FluidSynth with the Debian TimGM6mb soundfont (manifest, audio,
resume, determinism, validation, command line). The rendering tests fail, never skip,
when FluidSynth or the soundfont is missing: scripts/setup.sh installs both."""

import argparse
import csv
import io
import itertools
import json
import shutil

import mido
import numpy as np
import pytest
import soundfile as sf

from musicsteer.cli import probes_dataset as dataset_cli
from musicsteer.errors import MusicsteerError, UsageError
from musicsteer.probes import theory
from musicsteer.probes.dataset import (
    COLUMNS,
    FULL_PRESET,
    SYNTHEORY_COUNTS,
    ClipTask,
    DatasetError,
    Renderer,
    build_dataset,
    clip_seed,
    find_fluidsynth,
    find_soundfont,
    full_preset,
    load_manifest,
    plan_clips,
    render_task,
)
from musicsteer.probes.theory import STRONG, WEAK, make_clip

FAMILIES = ["chords", "time_signatures"]
PROGRAMS = [0, 24]


def seed_for(family, **want):
    """The smallest seed whose variation has the wanted fields (seed % count picks it)."""
    return next(s for s, v in enumerate(theory.FAMILIES[family].variations)
                if all(getattr(v, k) == x for k, x in want.items()))


def onsets(clip):
    """{start beat: sorted pitches} of the pitched notes."""
    out = {}
    for n in clip.pitched():
        out.setdefault(n.start, []).append(n.pitch)
    return {k: sorted(v) for k, v in sorted(out.items())}


# --- theory -----------------------------------------------------------------------------
def test_programs_are_syntheorys_92():
    assert len(theory.KEPT_PROGRAMS) == 92
    for dropped in (8, 9, 14, 21, 22, 23, 31, 47, 55, 77, 78, 86, 96, 103, 112, 118, 127):
        assert dropped not in theory.KEPT_PROGRAMS
    assert {0, 24, 40, 56, 73, 104, 111} <= set(theory.KEPT_PROGRAMS)
    assert len(theory.RHYTHM_PROGRAMS) == 25 and set(theory.RHYTHM_PROGRAMS) <= set(theory.KEPT_PROGRAMS)


def test_label_sets():
    F = theory.FAMILIES
    assert F["notes"].labels == ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
    assert F["intervals"].labels == ("m2", "M2", "m3", "M3", "P4", "TT", "P5", "m6", "M6", "m7", "M7", "P8")
    assert len(F["scales"].labels) == 7 and len(F["chords"].labels) == 12
    assert F["chords"].labels[:4] == ("major/root", "major/first", "major/second", "minor/root")
    assert F["progressions"].labels == (
        "major/I-IV-V-I", "major/I-IV-vi-V", "major/I-V-vi-IV", "major/I-vi-IV-V", "major/ii-V-I-vi",
        "major/IV-I-V-vi", "major/IV-V-iii-vi", "major/V-IV-I-V", "major/V-vi-IV-I", "major/vi-IV-I-V",
        "minor/i-iio-v-i", "minor/i-III-iv-i", "minor/i-iv-v-i", "minor/i-VI-III-VII", "minor/i-VI-VII-i",
        "minor/i-VI-VII-III", "minor/i-VII-VI-iv", "minor/iv-VII-i-i", "minor/VII-VI-VII-i")
    assert F["tempos"].labels[0] == "50" and F["tempos"].labels[-1] == "210" and len(F["tempos"].labels) == 161
    assert F["tempos"].regression and not F["chords"].regression
    assert F["time_signatures"].labels == ("2/2", "2/4", "3/4", "3/8", "4/4", "6/8", "9/8", "12/8")


def test_c_major_first_inversion_has_e_in_the_bass():
    clip = make_clip("chords", "major/first", 0, seed_for("chords", root=0))
    chords = onsets(clip)
    assert list(chords) == [0.0, 2.0, 4.0, 6.0]  # four 2-beat chords
    for pitches in chords.values():
        assert pitches == [64, 67, 72]  # E4 G4 C5: pitch classes {E, G, C}, E lowest
    assert theory.triad(60, "minor", "second") == (67, 72, 75)  # G C Eb
    assert theory.triad(62, "diminished", "root") == (62, 65, 68)
    assert theory.triad(60, "augmented", "first") == (64, 68, 72)


def test_chord_label_does_not_fix_the_root():
    roots = {make_clip("chords", "minor/root", 0, s).pitched()[0].pitch % 12 for s in range(12)}
    assert roots == set(range(12))


@pytest.mark.parametrize("label", theory.INTERVALS)
def test_intervals_span_their_semitones_in_every_style(label):
    semis = theory.INTERVAL_SEMITONES[label]
    for style in ("up", "down", "harmonic"):
        clip = make_clip("intervals", label, 0, seed_for("intervals", root=5, style=style))
        pitches = [n.pitch for n in clip.pitched()]
        assert {max(pitches) - min(pitches)} == {semis} and min(pitches) == 65
        if style == "up":
            assert pitches[:2] == [65, 65 + semis] and len(pitches) == 8
        elif style == "down":
            assert pitches[:2] == [65 + semis, 65]
        else:
            assert all(v == [65, 65 + semis] for v in onsets(clip).values()) and len(onsets(clip)) == 8


def test_scale_step_patterns():
    expected = {"ionian": "2212221", "dorian": "2122212", "phrygian": "1222122", "lydian": "2221221",
                "mixolydian": "2212212", "aeolian": "2122122", "locrian": "1221222"}
    for mode, steps in expected.items():
        up = make_clip("scales", mode, 0, seed_for("scales", root=2, style="up"))
        pitches = [n.pitch for n in up.pitched()]
        assert pitches[0] == 62 and pitches[-1] == 74
        assert "".join(str(b - a) for a, b in itertools.pairwise(pitches)) == steps
        down = make_clip("scales", mode, 0, seed_for("scales", root=2, style="down"))
        assert [n.pitch for n in down.pitched()] == pitches[::-1]
        assert [n.start for n in up.pitched()] == [float(i) for i in range(8)]


def test_progressions_roman_numerals_to_chords():
    names = theory.PITCH_CLASSES

    def chord_names(label, key):
        clip = make_clip("progressions", label, 0, seed_for("progressions", root=key))
        return [[names[p % 12] for p in ps] for ps in onsets(clip).values()]

    assert chord_names("major/I-V-vi-IV", 0) == [["C", "E", "G"], ["G", "B", "D"], ["A", "C", "E"],
                                                 ["F", "A", "C"]]
    assert chord_names("minor/i-iio-v-i", 9) == [["A", "C", "E"], ["B", "D", "F"], ["E", "G", "B"],
                                                 ["A", "C", "E"]]
    assert chord_names("major/ii-V-I-vi", 7) == [["A", "C", "E"], ["D", "F#", "A"], ["G", "B", "D"],
                                                 ["E", "G", "B"]]
    assert chord_names("minor/VII-VI-VII-i", 4) == [["D", "F#", "A"], ["C", "E", "G"], ["D", "F#", "A"],
                                                    ["E", "G", "B"]]


def test_notes_label_is_the_pitch_class_over_seven_octaves():
    for i, label in enumerate(theory.PITCH_CLASSES):
        octaves = set()
        for seed in range(theory.variation_count("notes")):
            pitches = {n.pitch for n in make_clip("notes", label, 0, seed).pitched()}
            assert len(pitches) == 1 and pitches.pop() % 12 == i
            octaves.add(make_clip("notes", label, 0, seed).pitched()[0].pitch // 12 - 1)
        assert octaves == set(range(1, 8))


def midi_note_ons(clip):
    """[(seconds, channel, note, velocity)] of note-ons, read back through mido."""
    midi = mido.MidiFile(file=io.BytesIO(_midi_bytes(clip)))
    now, out = 0.0, []
    for msg in midi:  # iterating a MidiFile yields messages with time in seconds
        now += msg.time
        if msg.type == "note_on" and msg.velocity > 0:
            out.append((round(now, 6), msg.channel, msg.note, msg.velocity))
    return out, midi.length


def _midi_bytes(clip):
    buf = io.BytesIO()
    theory.to_midi(clip).save(file=buf)
    return buf.getvalue()


@pytest.mark.parametrize("bpm", [50, 90, 120, 210])
def test_tempo_sets_the_pulse_in_seconds(bpm):
    clip = make_clip("tempos", str(bpm), 0, 0)
    assert clip.value == float(bpm)
    ons, length = midi_note_ons(clip)
    times = [t for t, ch, _, _ in ons if ch == 0]
    period = 60.0 / bpm
    n = int(np.ceil(4.0 / period - 1e-9))
    assert times == pytest.approx([k * period for k in range(n)], abs=1e-5)  # whole-µs MIDI tempo
    assert [t for t, ch, _, _ in ons if ch == theory.DRUM_CHANNEL] == times  # the wood block doubles it
    assert length == pytest.approx(4.0, abs=1e-5)  # MIDI tempo is in whole microseconds per beat


def test_time_signature_accent_patterns():
    assert theory.accent_pattern((2, 2)) == (STRONG, WEAK)
    assert theory.accent_pattern((3, 4)) == (STRONG, WEAK, WEAK)
    assert theory.accent_pattern((4, 4)) == (2, 0, 1, 0)
    assert theory.accent_pattern((3, 8)) == (STRONG, WEAK, WEAK)
    assert theory.accent_pattern((6, 8)) == (2, 0, 0, 1, 0, 0)
    assert theory.accent_pattern((12, 8)) == (2, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0)
    cases = {"2/2": (1.0, [120, 72]), "3/4": (0.5, [120, 72, 72]), "6/8": (0.25, [120, 72, 72, 96, 72, 72]),
             "9/8": (0.25, [120, 72, 72, 96, 72, 72, 96, 72, 72])}
    for label, (period, bar) in cases.items():
        clip = make_clip("time_signatures", label, 0, seed_for("time_signatures", root=0, reverb=0))
        ons, _ = midi_note_ons(clip)
        pitched = [(t, note, vel) for t, ch, note, vel in ons if ch == 0]
        assert [t for t, _, _ in pitched] == pytest.approx([k * period for k in range(len(pitched))])
        assert len(pitched) == round(4.0 / period)
        assert [v for _, _, v in pitched] == [bar[k % len(bar)] for k in range(len(pitched))]
        assert all(note == (72 if v == 120 else 60) for _, note, v in pitched)  # downbeat an octave up
        drums = [note for _, ch, note, _ in ons if ch == theory.DRUM_CHANNEL]
        assert drums == [76 if v == 120 else 77 for _, _, v in pitched]


def test_programs_play_in_their_keys():
    for seed in range(theory.variation_count("notes")):
        assert max(n.pitch for n in make_clip("notes", "B", 67, seed).pitched()) <= 79  # baritone sax
        assert min(n.pitch for n in make_clip("notes", "C", 68, seed).pitched()) >= 36  # oboe
        assert make_clip("notes", "B", 67, seed).pitched()[0].pitch % 12 == 11
    prog = make_clip("progressions", "minor/i-VI-VII-III", 67, seed_for("progressions", root=11))
    assert max(n.pitch for n in prog.pitched()) <= 79


def test_midi_lasts_the_clip():
    for family in theory.FAMILY_NAMES:
        clip = make_clip(family, theory.FAMILIES[family].labels[3], 40, 123)
        midi = theory.to_midi(clip)
        assert midi.length == pytest.approx(4.0, abs=1e-3)
        assert any(m.type == "program_change" and m.program == 40 for m in midi.tracks[0])


def test_make_clip_rejects_what_it_does_not_know():
    for args in [("genres", "rock", 0, 0), ("chords", "major/fifth", 0, 0), ("notes", "C", 128, 0),
                 ("notes", "H", 0, 0)]:
        with pytest.raises(ValueError):
            make_clip(*args)


def test_clip_seeds_cover_the_variations_once():
    for family in ("intervals", "chords", "notes"):
        n = theory.variation_count(family)
        seeds = [clip_seed(0, family, theory.FAMILIES[family].labels[1], 24, i) for i in range(n)]
        assert sorted(s % n for s in seeds) == list(range(n))
        assert seeds == [clip_seed(0, family, theory.FAMILIES[family].labels[1], 24, i) for i in range(n)]
        assert seeds != [clip_seed(1, family, theory.FAMILIES[family].labels[1], 24, i) for i in range(n)]


def test_full_preset_reproduces_syntheory_counts():
    programs, per_label = full_preset()
    tasks = plan_clips(list(theory.FAMILY_NAMES), programs, per_label, 0)
    counts = {f: sum(t.family == f for t in tasks) for f in theory.FAMILY_NAMES}
    assert counts == SYNTHEORY_COUNTS and len(tasks) == 104_585
    assert len({t.wav for t in tasks}) == len(tasks)  # ids are unique
    assert set(FULL_PRESET) == set(theory.FAMILY_NAMES)


# --- rendering --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def renderer():
    try:
        return Renderer(find_fluidsynth(), str(find_soundfont()), 32000)
    except DatasetError as exc:
        pytest.fail(f"concept datasets need FluidSynth and a GM soundfont (run scripts/setup.sh): {exc}")


@pytest.fixture(scope="module")
def built(tmp_path_factory, renderer):
    out = tmp_path_factory.mktemp("concepts")
    report = build_dataset(out, FAMILIES, PROGRAMS, 1, seed=0, workers=2, progress=False)
    return out, report


def test_build_writes_manifest_and_description(built):
    out, report = built
    assert report.counts == {"chords": 24, "time_signatures": 16} and report.rendered == 40
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == 40
    assert {(r["family"], r["program"]) for r in rows} == {(f, str(p)) for f in FAMILIES for p in PROGRAMS}
    assert {r["label"] for r in rows if r["family"] == "chords"} == set(theory.FAMILIES["chords"].labels)
    assert all(r["value"] == "" and r["duration_s"] == "4.0" for r in rows)
    assert rows[0]["clip"] == "clips/chords/major-root_p000_000.wav"
    for r in rows:
        clip = make_clip(r["family"], r["label"], int(r["program"]), int(r["seed"]))
        assert clip.label == r["label"]
        assert (out / r["clip"]).is_file() and (out / r["clip"]).with_suffix(".mid").is_file()
    info = json.loads((out / "dataset.json").read_text())
    assert info["complete"] and info["families"] == FAMILIES and info["sample_rate"] == 32000
    assert info["labels"]["time_signatures"] == list(theory.FAMILIES["time_signatures"].labels)
    assert info["programs"] == {f: PROGRAMS for f in FAMILIES} and info["per_label"] == {f: 1 for f in FAMILIES}
    assert info["counts"] == {"chords": 24, "time_signatures": 16, "total": 40} and info["seed"] == 0
    assert info["soundfont"].endswith(".sf2") and len(info["soundfont_sha256"]) == 64
    assert "fluidsynth" in info["tools"] and "mido" in info["tools"]
    rows = load_manifest(out)
    assert len(rows) == 40 and rows[0].path == (out / rows[0].clip).resolve() and rows[0].value is None


def test_audio_is_mono_32k_four_seconds_and_sounds(built):
    out, _ = built
    for row in load_manifest(out):
        info = sf.info(row.path)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (32000, 1, 128000, "PCM_16")
        audio, _ = sf.read(row.path)
        assert np.abs(audio).max() == pytest.approx(10 ** (-3 / 20), abs=1e-3)  # peak-normalised
        assert np.sqrt(np.mean(audio ** 2)) > 0.01  # sound throughout, not one click
        assert audio[-1] == 0 and np.abs(audio[-20:]).max() < 0.01  # faded out at the cut


def test_chord_audio_has_the_labelled_pitch_classes(built):
    out, _ = built
    for row in load_manifest(out):
        if row.family != "chords":
            continue
        audio, sr = sf.read(row.path)
        seg = audio[8000:24000] * np.hanning(16000)  # inside the first chord
        spec, freqs = np.abs(np.fft.rfft(seg)) ** 2, np.fft.rfftfreq(16000, 1 / sr)
        band = (freqs > 50) & (freqs < 2000)
        chroma = np.zeros(12)
        np.add.at(chroma, np.round(69 + 12 * np.log2(freqs[band] / 440)).astype(int) % 12, spec[band])
        want = {n.pitch % 12 for n in make_clip(row.family, row.label, row.program, row.seed).pitched()}
        assert set(np.argsort(chroma)[-3:]) == want, row.clip


def test_time_signature_audio_accents_the_downbeats(built):
    out, _ = built
    for row in load_manifest(out):
        if row.family != "time_signatures" or row.label not in ("3/4", "6/8", "2/4"):
            continue
        audio, sr = sf.read(row.path)
        clip = make_clip(row.family, row.label, row.program, row.seed)
        loud = {STRONG: [], WEAK: []}
        for n in clip.pitched():
            level = {120: STRONG, 72: WEAK}.get(n.velocity)
            if level is not None:
                i = round(clip.seconds(n.start) * sr)
                loud[level].append(np.sqrt(np.mean(audio[i:i + sr // 50] ** 2)))  # first 20 ms
        assert min(loud[STRONG]) > 1.5 * np.mean(loud[WEAK]), row.clip


def test_rerun_renders_nothing(built):
    out, _ = built
    manifest = (out / "manifest.csv").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("clips/*/*.wav")}
    report = build_dataset(out, FAMILIES, PROGRAMS, 1, seed=0, workers=2, progress=False)
    assert (report.rendered, report.skipped) == (0, 40)
    assert (out / "manifest.csv").read_bytes() == manifest
    assert {p: p.stat().st_mtime_ns for p in out.glob("clips/*/*.wav")} == stamps


def test_resume_after_an_interrupted_run(built, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(built[0], out)
    rows = load_manifest(out)
    (out / rows[3].clip).unlink()  # never written
    (out / rows[5].clip).write_bytes((out / rows[5].clip).read_bytes()[:5000])  # truncated by hand
    stale = out / "clips" / "chords" / ".major-root_p000_000.wav.partial"
    stale.write_bytes(b"half a file")
    report = build_dataset(out, FAMILIES, PROGRAMS, 1, seed=0, workers=1, progress=False)
    assert (report.rendered, report.skipped) == (2, 38)
    assert not stale.exists()
    for i in (3, 5):
        assert (out / rows[i].clip).read_bytes() == (built[0] / rows[i].clip).read_bytes()


def test_same_clip_renders_to_identical_bytes(built, renderer, tmp_path):
    out, _ = built
    row = load_manifest(out)[7]
    task = ClipTask(row.family, row.label, row.program, 0, row.seed)
    for d in ("a", "b"):
        render_task(task, tmp_path / d, renderer)
    a, b = (tmp_path / "a" / task.wav).read_bytes(), (tmp_path / "b" / task.wav).read_bytes()
    assert a == b == (out / row.clip).read_bytes()  # serial here, a worker process in the build
    assert (tmp_path / "a" / task.mid).read_bytes() == (out / task.mid).read_bytes()


def _copy_with_manifest(src, dst, edit):
    shutil.copytree(src, dst)
    with open(dst / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    with open(dst / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return dst


def test_manifest_validation_errors(built, tmp_path):
    src = built[0]
    d = tmp_path / "missing"
    shutil.copytree(src, d)
    gone = load_manifest(d)[4].clip
    (d / gone).unlink()
    with pytest.raises(DatasetError, match=rf"manifest.csv:6: {gone} is missing"):
        load_manifest(d)

    d = _copy_with_manifest(src, tmp_path / "label", lambda rows: rows[2].update(label="major/fifth"))
    with pytest.raises(DatasetError, match=r"manifest.csv:4: label 'major/fifth' is not one of"):
        load_manifest(d)

    d = _copy_with_manifest(src, tmp_path / "family", lambda rows: rows[30].update(family="genres"))
    with pytest.raises(DatasetError, match=r"manifest.csv:32: unknown family 'genres'") as err:
        load_manifest(d)
    assert "\n" not in str(err.value) and isinstance(err.value, MusicsteerError)

    d = _copy_with_manifest(src, tmp_path / "value", lambda rows: rows[0].update(value="3.5"))
    with pytest.raises(DatasetError, match="classification family, so value must be empty"):
        load_manifest(d)

    d = tmp_path / "unfinished"
    shutil.copytree(src, d)
    (d / "manifest.csv").unlink()
    with pytest.raises(DatasetError, match="did not finish"):
        load_manifest(d)


def test_regression_rows_carry_the_bpm(built, tmp_path):
    d = tmp_path / "tempos"
    shutil.copytree(built[0], d)
    info = json.loads((d / "dataset.json").read_text())
    info["labels"]["tempos"] = list(theory.FAMILIES["tempos"].labels)
    info["targets"] = {"tempos": "bpm"}
    (d / "dataset.json").write_text(json.dumps(info))
    with open(d / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow([load_manifest(d)[0].clip, "tempos", "96", "96.0", 0, 1, 4.0])
    assert load_manifest(d)[-1].value == 96.0
    with open(d / "manifest.csv", "a", newline="") as f:
        csv.writer(f).writerow([load_manifest(d)[0].clip, "tempos", "97", "", 0, 1, 4.0])
    with pytest.raises(DatasetError, match=r"manifest.csv:43: tempos is a regression family"):
        load_manifest(d)


def test_user_errors_are_one_line(built, tmp_path):
    with pytest.raises(DatasetError, match="timgm6mb-soundfont"):
        build_dataset(tmp_path / "x", ["chords"], [0], 1, soundfont=tmp_path / "none.sf2", workers=1)
    (tmp_path / "text.sf2").write_text("not a soundfont")
    with pytest.raises(DatasetError, match="is not a SoundFont"):
        build_dataset(tmp_path / "x", ["chords"], [0], 1, soundfont=tmp_path / "text.sf2", workers=1)
    with pytest.raises(DatasetError, match="another seed"):
        build_dataset(built[0], FAMILIES, PROGRAMS, 1, seed=1, workers=1)
    with pytest.raises(DatasetError, match="unknown concept family 'genres'"):
        build_dataset(tmp_path / "y", ["genres"], [0], 1, workers=1)
    with pytest.raises(DatasetError, match="0..127"):
        build_dataset(tmp_path / "y", ["chords"], [130], 1, workers=1)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="musicsteer")
    probes = parser.add_subparsers(dest="command").add_parser("probes").add_subparsers(dest="probes_command")
    dataset_cli.register(probes)
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_resumes_and_summarises(built, tmp_path, capsys):
    d = tmp_path / "cli"
    shutil.copytree(built[0], d)
    assert _cli(["probes", "dataset", "--out", str(d), "--families", "chords,time_signatures",
                 "--programs", "0,24", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "40 clips" in out and "0 rendered, 40 already there" in out
    assert "chords                24 clips  (12 labels x 2 programs x 1)" in out
    with pytest.raises(UsageError, match="--programs"):
        _cli(["probes", "dataset", "--out", str(d), "--programs", "0,300"])
    with pytest.raises(UsageError, match="--full"):
        _cli(["probes", "dataset", "--out", str(d), "--full", "--per-label", "2"])
    with pytest.raises(UsageError, match="unknown family 'genre'"):
        _cli(["probes", "dataset", "--out", str(d), "--families", "chords,genre"])
    assert dataset_cli.parse_programs("0,24-26") == (0, 24, 25, 26)
    assert dataset_cli.parse_programs("all") == theory.KEPT_PROGRAMS
