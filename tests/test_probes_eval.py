"""`probes eval`'s steering measurements (MusicRFM's Table 2 in miniature): CREPE's pitch-class
shares on real audio (sines, FluidSynth notes), how verdicts add up per case and segment, and
the plumbing on the tiny random model (negative strengths, rows, schedules, crossfades, groups,
the program probe, the CLI and its errors). On random weights the rates mean nothing musically:
the tests prove what is measured and how, not that steering works (that is for a trained model)."""

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest

from musicsteer.cli import main
from musicsteer.model.delay import steps_for
from musicsteer.probes import evaluate, theory
from musicsteer.probes.common import ProbeError
from musicsteer.probes.dataset import build_dataset
from musicsteer.probes.eval_cases import Case, Verdict, build_cases, install, summarise
from musicsteer.probes.eval_report import format_eval
from musicsteer.probes.evaluate import EvalOptions, run_generation_eval, steering_pitch_table
from musicsteer.probes.extract import ExtractSettings, extract
from musicsteer.probes.train import train_pack
from musicsteer.steering.plan import SteeringPlan, SteeringSettings

crepe = pytest.mark.skipif(importlib.util.find_spec("torchcrepe") is None,
                           reason="torchcrepe is installed by scripts/setup.sh (--no-deps)")
RATE = 32000


def tone(midi, seconds, rate=RATE):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    out = tmp_path_factory.mktemp("notes-data")
    build_dataset(out, families=["notes"], programs=[0, 40], per_label=1, seed=3, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def features(notes, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("notes-features") / "f"
    extract(tiny, notes, out, ExtractSettings(prompt="music", batch=8), progress=False)
    return out


@pytest.fixture(scope="module")
def pack(features, tmp_path_factory):
    out = tmp_path_factory.mktemp("notes-pack") / "pack"
    train_pack(features, method="linear", families=["notes"], out_dir=out, progress=False)
    return out


@crepe
def test_a_440_hz_sine_is_all_a():
    from musicsteer.probes.pitch import class_shares, frame_classes

    shares = class_shares(frame_classes(tone(69, 1.0), RATE))
    assert shares.voiced > 0.9 and shares.shares[9] > 0.95
    assert shares.shares.sum() == pytest.approx(1.0)


@crepe
def test_a_c_then_g_reads_c_falling_and_g_rising_by_segment():
    """Half a second of C5 then of G5: the crossfade case's shares per quarter go 1, 1, 0, 0
    for C and the other way for G; toward either of them, every quarter is all voiced frames."""
    from musicsteer.probes.pitch import class_shares, frame_classes

    audio = np.concatenate([tone(72, 0.5), tone(79, 0.5)])
    shares = class_shares(frame_classes(audio, RATE), segments=4)
    fires = np.zeros((4, 12), bool)
    fires[:2, 0] = fires[2:, 7] = True  # the detectors on each quarter: C, C, G, G
    verdict = Verdict(label=0, fires=np.zeros(12, bool), pitch=shares, segment_labels=np.array([0, 0, 7, 3]),
                      segment_fires=fires)
    names = [f"notes-{p}" for p in theory.PITCH_CLASSES]
    out = summarise(("notes-C", "notes-G"), [verdict], names, {n: i for i, n in enumerate(names)}, None)
    c, g = np.array(out["pitch_segments"]["notes-C"]), np.array(out["pitch_segments"]["notes-G"])
    assert c[0] > 0.9 and c[3] < 0.1 and g[0] < 0.1 and g[3] > 0.9
    assert np.all(np.diff(c) <= 0.05) and np.all(np.diff(g) >= -0.05)
    assert min(out["pitch_any_segments"]) > 0.9 and out["pitch_any"] > 0.9
    assert out["detected_segments"] == {"notes-C": [1, 1, 0, 0], "notes-G": [0, 0, 1, 1]}
    assert out["accuracy_segments"] == {"notes-C": [1, 1, 0, 0], "notes-G": [0, 0, 1, 0]}


def test_silence_has_no_share_and_no_voiced_frames():
    from musicsteer.probes.pitch import class_shares

    shares = class_shares(np.full(100, -1), segments=3)
    assert shares.voiced == 0.0 and not shares.shares.any() and shares.segments.shape == (3, 12)


@crepe
def test_fluidsynth_notes_in_crepes_range_read_their_pitch_class(notes):
    """The dataset's own notes (TimGM6mb piano and violin), the first four whose pitch lies in
    MIDI 40..96 (82 Hz to 2 kHz: CREPE's range, with room): most voiced frames at the label."""
    from musicsteer.probes.pitch import PITCH_CLASSES, class_shares, frame_classes
    import soundfile as sf

    with open(notes / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    picked = [r for r in rows
              if 40 <= theory.make_clip("notes", r["label"], int(r["program"]), int(r["seed"])).notes[0].pitch <= 96]
    for r in picked[:4]:
        audio, rate = sf.read(notes / r["clip"], dtype="float32")
        shares = class_shares(frame_classes(audio[: 2 * rate], rate))  # the first two seconds
        assert shares.shares[PITCH_CLASSES.index(r["label"])] > 0.8, r


@crepe
def test_the_torchaudio_stand_in_leaves_no_trace_for_transformers():
    from musicsteer.probes.pitch import import_torchcrepe

    import_torchcrepe()
    importlib.util.find_spec("torchaudio")  # raised ValueError while the spec-less stand-in stayed in sys.modules
    assert getattr(sys.modules.get("torchaudio"), "__spec__", True) is not None


def test_cases_from_the_options():
    names = [f"notes-{p}" for p in theory.PITCH_CLASSES]
    sweep, extra = build_cases("notes", names, ["C", "notes-G"], "decay:0.9", ["C,G"], ["C,E,G"])
    assert [c.targets for c in sweep] == [("notes-C",), ("notes-G",)]
    assert sweep[0].schedule(2) == pytest.approx(0.81)
    assert [(c.kind, c.targets) for c in extra] == [("crossfade", ("notes-C", "notes-G")),
                                                     ("together", ("notes-C", "notes-E", "notes-G"))]
    assert len(build_cases("notes", names, None, None)[0]) == 12
    for bad, match in [(dict(targets=["H"]), "not a concept"), (dict(crossfades=["C"]), "takes 2"),
                       (dict(crossfades=["C,E,G"]), "takes 2"), (dict(together=["C,C"]), "different"),
                       (dict(schedule="crossfade:G:4"), "--crossfade"), (dict(schedule="decay:2"), "decay rate")]:
        with pytest.raises(ProbeError, match=match):
            build_cases("notes", names, bad.get("targets"), bad.get("schedule"), bad.get("crossfades", ()),
                        bad.get("together", ()))


def test_a_crossfade_case_hands_the_strength_from_one_concept_to_the_other():
    names = ["notes-C", "notes-E", "notes-G"]
    plan = SteeringPlan(names, np.ones((3, 2)), SteeringSettings(), batch=2)
    install(plan, Case("together", "together", ("notes-C", "notes-E")), 0.5, 100)
    assert list(plan.concept_strengths(10)) == [0.5, 0.5, 0.0]
    install(plan, Case("x", "crossfade", ("notes-C", "notes-G")), 0.5, 100)  # the group is undone
    assert list(plan.concept_strengths(0)) == [0.5, 0.0, 0.0]
    assert list(plan.concept_strengths(50)) == [0.25, 0.0, 0.25]
    assert list(plan.concept_strengths(100)) == [0.0, 0.0, 0.5]


@pytest.fixture
def alphas(monkeypatch):
    """Every alpha the eval's plan writes, in order: (L, B, K) per step."""
    written = []
    original = SteeringPlan.write

    def write(self, step, steerer):
        written.append(self.alpha(step).copy())
        original(self, step, steerer)

    monkeypatch.setattr(SteeringPlan, "write", write)
    return written


@crepe
def test_eval_with_every_judge_and_case(tiny, features, pack, alphas):
    options = EvalOptions(targets=("C", "G"), crossfades=("C,G",), together=("C,E",), pitch="tiny", segments=2,
                          program=40)
    record = run_generation_eval(tiny, features, pack, "notes", [-3.0, 0.0, 3.0], per_concept=1, duration=0.3,
                                 prompt="violin", gate=1.0, seed=0, options=options)
    json.dumps(record)  # what --json writes
    assert [r["strength"] for r in record["table"]] == [-3.0, 0.0, 3.0]
    assert record["targets"] == ["notes-C", "notes-G"] and record["pitch"]["crepe"] == "tiny"
    for row in record["table"]:
        assert set(row["per_concept_pitch"]) == {"notes-C", "notes-G"} and len(row["pitch_segments"]) == 2
        assert len(row["detected_segments"]) == len(row["accuracy_segments"]) == 2
        assert all(0.0 <= row[k] <= 1.0 for k in ("accuracy", "detected", "pitch", "voiced", "program"))
    probe = record["program_probe"]
    assert probe["program"] == 40 and probe["programs"] == [0, 40] and probe["chance"] == 0.5
    assert [c["kind"] for c in record["cases"]] == ["crossfade", "together"]
    for case in record["cases"]:
        assert [r["strength"] for r in case["table"]] == [-3.0, 0.0, 3.0]
        assert all(len(r["pitch_segments"][n]) == len(r["detected_segments"][n]) == 2 and "pitch_any" in r
                   for r in case["table"] for n in case["targets"])
    # the unsteered generations are judged once, for every target and case
    zero = record["table"][1]
    assert all(case["table"][1]["voiced"] == zero["voiced"] for case in record["cases"])
    # 2 targets + 2 cases, at two non-zero strengths: 8 steered generations of 15 frames (18 steps)
    assert len(alphas) == 8 * steps_for(15, 4) == 8 * 18
    negative, positive = alphas[: 4 * 18], alphas[4 * 18:]
    assert all((a <= 0).all() for a in negative) and any((a < 0).any() for a in negative)
    assert all((a >= 0).all() for a in positive) and any((a > 0).any() for a in positive)
    text = format_eval(record)
    for words in ("pitch", "voiced", "program", "CREPE share toward each target", "crossfade notes-C -> notes-G",
                  "together notes-C + notes-E", "1/2", "per time segment (2 of the clip): detected"):
        assert words in text


def test_negative_strengths_steer_along_the_flipped_direction(tiny, features, pack, monkeypatch):
    """At -s the generations differ from the unsteered ones and from those at +s (the same seeds)."""
    codes = []
    original = evaluate.generate

    def kept(*args, **kwargs):
        out = original(*args, **kwargs)
        codes.append(out.codes)
        return out

    monkeypatch.setattr(evaluate, "generate", kept)
    run_generation_eval(tiny, features, pack, "notes", [-40.0, 0.0, 40.0], per_concept=1, duration=0.2,
                        prompt="music", gate=1.0, seed=0, options=EvalOptions(targets=("C",)))
    minus, zero, plus = codes
    assert not np.array_equal(minus, zero) and not np.array_equal(plus, zero) and not np.array_equal(minus, plus)


@pytest.mark.parametrize("rows", ["both", "cond"])
def test_rows_reach_the_steering(tiny, features, pack, alphas, rows):
    record = run_generation_eval(tiny, features, pack, "notes", [2.0], per_concept=1, duration=0.2, prompt="music",
                                 gate=1.0, seed=0, options=EvalOptions(rows=rows, targets=("D",)))
    assert record["rows"] == rows
    a = np.stack(alphas)  # (steps, L, B, K)
    assert (a[:, :, 0] > 0).any()
    assert (a[:, :, 1] > 0).any() == (rows == "both") and np.array_equal(a[:, :, 0], a[:, :, 1]) == (rows == "both")


def test_a_schedule_multiplies_the_targets_strength(tiny, features, pack, alphas):
    record = run_generation_eval(tiny, features, pack, "notes", [2.0], per_concept=1, duration=0.2, prompt="music",
                                 gate=1.0, seed=0, options=EvalOptions(targets=("D",), schedule="linear-down:10"))
    k = record["labels"].index("D")  # the plan's concepts are the family's labels, in the store's order
    top = [float(a[:, 0, k].max()) for a in alphas]
    assert top[0] > 0 and top[5] == pytest.approx(top[0] / 2) and top[10] == 0.0


@crepe
def test_steering_pitch_table_lines_up_shares_with_strengths(tiny, features, pack):
    table = steering_pitch_table(tiny, features, pack, [0.0, 1.0], targets=["A"], per_concept=1, duration=0.2,
                                 gate=1.0)
    assert table["strengths"] == [0.0, 1.0] and table["chance"] == pytest.approx(1 / 12)
    assert list(table["share"]) == ["notes-A"] and len(table["share"]["notes-A"]) == 2
    assert len(table["voiced"]) == 2 and table["record"]["pitch"]["crepe"] == "tiny"


def test_pitch_needs_the_notes_family():
    from musicsteer.probes.evaluate import note_pitch_classes

    labels = list(theory.FAMILIES["intervals"].labels)
    with pytest.raises(ProbeError, match="notes family"):
        note_pitch_classes("intervals", labels, [f"intervals-{x}" for x in labels])
    assert note_pitch_classes("notes", ["C", "A"], ["notes-C", "notes-A"]) == {"notes-C": 0, "notes-A": 9}


def test_the_program_probe_tells_the_stores_programs_apart(features):
    """On the tiny model's features of piano and violin notes: the probe's held-out accuracy is
    recorded, and it classifies the store's own clips by their program."""
    from musicsteer.probes.features import load_features

    store = load_features(features)
    probe = evaluate.ProgramProbe(store, layer=1, program=40, seed=0)
    described = probe.describe(1)
    assert described["programs"] == [0, 40] and described["program"] == 40 and 0 <= described["held_out_accuracy"] <= 1
    X = store.layer(1, np.arange(len(store.program)))
    predicted = np.array([probe.predict(x[None]) for x in X])
    assert (predicted == store.program).mean() > 0.9


def test_the_program_probe_needs_two_programs(features, pack, tiny, tmp_path):
    import shutil

    store = tmp_path / "f"
    shutil.copytree(features, store)
    with open(store / "index.csv") as f:
        rows = list(csv.DictReader(f))
    with open(store / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "program": "0"} for r in rows)
    with pytest.raises(ProbeError, match="at least two"):
        run_generation_eval(tiny, store, pack, "notes", [0.0], 1, 0.2, "music", 1.0, 0, options=EvalOptions(program=0))


def test_the_program_probe_needs_a_program_of_the_store(tiny, features, pack):
    with pytest.raises(ProbeError, match="no clips of program 7"):
        run_generation_eval(tiny, features, pack, "notes", [0.0], 1, 0.2, "music", 1.0, 0,
                            options=EvalOptions(program=7))


@crepe
def test_cli_eval_with_pitch_and_program_writes_json(features, pack, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["probes", "eval", "--model", "tiny", "--features", str(features), "--concepts", str(pack),
                 "--family", "notes", "--strengths=-1,0", "--targets", "C", "--per-concept", "1",
                 "--duration", "0.2", "--pitch", "--segments", "2", "--program-probe", "--prompt-program", "0",
                 "--rows", "cond", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["strength"] for r in record["table"]] == [-1.0, 0.0] and record["rows"] == "cond"
    assert record["program_probe"]["program"] == 0 and len(record["table"][0]["pitch_segments"]) == 2
    assert "CREPE share toward each target" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--program-probe"], "go together"),
    (["--prompt-program", "0"], "go together"),
    (["--crepe", "full"], "only applies with --pitch"),
    (["--crossfade", "C"], "takes 2"),
    (["--targets", "H"], "not a concept"),
    (["--schedule", "crossfade:G:4"], "--crossfade"),
    (["--strengths", "0,x"], "expected numbers"),
    (["--strengths", "0,nan"], "finite"),
    (["--segments", "0"], "at least 1"),
    (["--segments", "11"], "use 1 to 10"),
])
def test_cli_eval_refuses_bad_options_in_one_line(features, pack, capsys, extra, message):
    rc = main(["probes", "eval", "--model", "tiny", "--features", str(features), "--concepts", str(pack),
               "--family", "notes", "--per-concept", "1", "--duration", "0.2", *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and len(err.splitlines()) == 1
