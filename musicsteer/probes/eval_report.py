"""`probes eval`'s record as text tables: the per-target sweep (probe rates, CREPE's shares,
the program probe, CLAP), CREPE's share toward each target, the rates per time segment, and
one table per crossfade or concept group. It reads the record `run_generation_eval` returns
and nothing else."""

from __future__ import annotations


def _short(name: str, family: str) -> str:
    return name[len(family) + 1:] if name.startswith(family + "-") else name


def format_eval(record: dict) -> str:
    family, pitch, program = record["family"], record.get("pitch"), record.get("program_probe")
    lines = [f"probe accuracy on generations: family {family} (layer {record['layer']}, "
             f"{len(record['labels'])} labels, chance {record['chance']:.3f}, {record['per_concept']} clips per cell)",
             f"gate {record['gate']:g} per {record.get('gate_per', 'step')}, rows {record.get('rows', 'both')}, "
             f"mode {record.get('mode', 'add')}, "
             f"schedule {record.get('schedule', 'constant')}; accuracy: classified as the target (1/C at strength 0 "
             "by construction); detected: the target's detector fires (at 0: the unsteered baseline)"]
    if pitch:
        lines.append(f"pitch: CREPE ({pitch['crepe']}) share of voiced frames (periodicity > "
                     f"{pitch['periodicity_above']:g}, {pitch['hop_ms']:g} ms hop) at the target's pitch class, chance "
                     f"{pitch['chance']:.3f}; voiced: share of frames voiced")
    if program:
        held = program["held_out_accuracy"]
        lines.append(f"program: share classified as GM program {program['program']} by a probe on "
                     f"{len(program['programs'])} programs (held-out accuracy "
                     f"{'-' if held is None else format(held, '.3f')}, chance {program['chance']:.3f})")
    columns = [("accuracy", "accuracy"), ("detected", "detected")]
    columns += [("pitch", "pitch"), ("voiced", "voiced")] if pitch else []
    columns += [("program", "program")] if program else []
    columns += [("clap", "CLAP")] if record["clap"] else []
    lines.append(f"{'strength':>9}" + "".join(f" {title:>9}" for _, title in columns))
    for row in record["table"]:
        lines.append(f"{row['strength']:9.3f}" + "".join(f" {row[key]:9.3f}" for key, _ in columns))
    if pitch:
        lines += _pitch_tables(record)
    if "detected_segments" in record["table"][0]:
        lines += _segments("detected (the target's detector on each segment's pooled states, mean over targets)",
                           record["table"], "detected_segments")
    for case in record.get("cases", []):
        lines += _case_table(case, family, pitch is not None)
    lines.append(record["clap_note"])
    return "\n".join(lines)


def _pitch_tables(record: dict) -> list[str]:
    family, table = record["family"], record["table"]
    targets = list(table[0]["per_concept_pitch"])
    lines = ["CREPE share toward each target (strength 0: the unsteered share, each target's baseline)",
             f"{'strength':>9}" + "".join(f" {_short(n, family):>6}" for n in targets)]
    for row in table:
        lines.append(f"{row['strength']:9.3f}" + "".join(f" {row['per_concept_pitch'][n]:6.3f}" for n in targets))
    return lines + _segments("CREPE share toward the target (mean over targets)", table, "pitch_segments")


def _segments(title: str, table: list[dict], key: str) -> list[str]:
    segments = len(table[0][key])
    lines = [f"per time segment ({segments} of the clip): {title}",
             f"{'strength':>9}" + "".join(f" {f'{i + 1}/{segments}':>6}" for i in range(segments))]
    for row in table:
        lines.append(f"{row['strength']:9.3f}" + "".join(f" {v:6.3f}" for v in row[key]))
    return lines


def _case_table(case: dict, family: str, pitch: bool) -> list[str]:
    targets = case["targets"]
    segmented = "detected_segments" in case["table"][0]
    lines = [f"{case['case']}: per target, accuracy / detected" + (" [per time segment]" if segmented else "")
             + ("; CREPE share over the clip [per time segment]" if pitch else "")]
    for row in case["table"]:
        cells = []
        for n in targets:
            cell = f"{_short(n, family)} {row['accuracy'][n]:.2f}/{row['detected'][n]:.2f}"
            if segmented:
                cell += " [" + " ".join(f"{v:.2f}" for v in row["detected_segments"][n]) + "]"
            if pitch:
                cell += f" share {row['pitch'][n]:.3f} [" + " ".join(f"{v:.2f}" for v in row["pitch_segments"][n]) + "]"
            cells.append(cell)
        if pitch and "pitch_any" in row:
            cells.append(f"any {row['pitch_any']:.3f} [" + " ".join(f"{v:.2f}" for v in row["pitch_any_segments"]) + "]")
        if pitch:
            cells.append(f"voiced {row['voiced']:.2f}")
        if "program" in row:
            cells.append(f"program {row['program']:.2f}")
        lines.append(f"{row['strength']:9.3f}  " + "; ".join(cells))
    return lines
