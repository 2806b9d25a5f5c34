"""The feature store as probe training reads it: loading and checking `pooled.npy`,
`index.csv` and `meta.json`, concept families, concept names, and the train/validation
split.

Store contract (written by `probes/extract.py`): `pooled.npy` float [L, N, D] (read as a
memmap), `index.csv` with the columns clip,family,label,value,program and N rows in the
same order, `meta.json` with {"model": {"id", "layers", "hidden"}, ...}, and, while an
extraction is unfinished, `done.npy` bool [N].

A family whose rows all carry a `value` is a regression family (one concept, named as
the family); otherwise each label is a one-vs-rest concept named `<family>-<label>`,
with characters outside [A-Za-z0-9_+#-] replaced by '-' (e.g. `chords-major`,
`notes-C#`, `time_signatures-4-4`, `tempos`).

The split is deterministic for a seed and stratified (by label, or by value quintile for
regression). It first tries to hold whole synthesized programs (instruments) out of
training; when that cannot give every stratum clips on both sides (or the store has
fewer than two programs), it falls back to a plain stratified split and says so.
"""

from __future__ import annotations

import csv
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import ProbeError

COLUMNS = ("clip", "family", "label", "value", "program")
_BAD = re.compile(r"[^A-Za-z0-9_+#\-]+")


@dataclass
class FeatureStore:
    directory: Path
    pooled: np.ndarray  # (L, N, D) memmap
    family: np.ndarray  # (N,) str
    label: np.ndarray  # (N,) str
    value: np.ndarray  # (N,) float, nan where empty
    program: np.ndarray  # (N,) str, "" where empty
    meta: dict

    @property
    def layers(self) -> int:
        return self.pooled.shape[0]

    @property
    def hidden(self) -> int:
        return self.pooled.shape[2]

    def layer(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Pooled features (n, D) of `rows` at `layer`, as float32."""
        X = np.asarray(self.pooled[layer][rows], dtype=np.float32)  # (n, D)
        if not np.isfinite(X).all():
            raise ProbeError(f"{self.directory}/pooled.npy holds non-finite values at layer {layer}")
        return X


def load_features(directory: Path | str) -> FeatureStore:
    d = Path(directory)
    if not d.is_dir():
        raise ProbeError(f"feature store {d} does not exist; extract features first (`musicsteer probes extract`)")
    for name in ("pooled.npy", "index.csv", "meta.json"):
        if not (d / name).exists():
            raise ProbeError(f"{d} is not a feature store: {name} is missing")
    try:
        pooled = np.load(d / "pooled.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read {d / 'pooled.npy'}: {str(exc).splitlines()[0]}") from exc
    if pooled.ndim != 3 or not np.issubdtype(pooled.dtype, np.floating) or 0 in pooled.shape:
        raise ProbeError(f"{d / 'pooled.npy'} must be a float array [layers, clips, hidden]; "
                         f"it is {pooled.dtype} {tuple(pooled.shape)}")
    L, N, D = pooled.shape
    try:
        meta = json.loads((d / "meta.json").read_text())
        model = meta["model"]
        shape = (int(model["layers"]), int(model["hidden"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProbeError(f"{d / 'meta.json'} has no readable model id/layers/hidden ({exc})") from exc
    if shape != (L, D):
        raise ProbeError(f"{d / 'meta.json'} says {shape[0]} layers x {shape[1]} hidden but pooled.npy is "
                         f"{L} x {N} x {D}")
    rows = _read_index(d / "index.csv")
    if len(rows) != N:
        raise ProbeError(f"{d / 'index.csv'} has {len(rows)} rows but pooled.npy holds {N} clips")
    if (d / "done.npy").exists():
        done = np.load(d / "done.npy")
        if done.shape != (N,) or not done.all():
            raise ProbeError(f"{d}: the extraction is unfinished ({int(done.sum())} of {N} clips); "
                             "run the extraction again to complete it")
    value = np.full(N, np.nan)
    for i, r in enumerate(rows):
        if r["value"].strip():
            try:
                value[i] = float(r["value"])
            except ValueError:
                raise ProbeError(f"{d / 'index.csv'} row {i + 2}: value {r['value']!r} is not a number") from None
    return FeatureStore(d, pooled, np.array([r["family"] for r in rows]), np.array([r["label"] for r in rows]),
                        value, np.array([r["program"].strip() for r in rows]), meta)


def _read_index(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ProbeError(f"{path} lacks the column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
            rows = [{c: (r.get(c) or "") for c in COLUMNS} for r in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ProbeError(f"cannot read {path}: {exc}") from exc
    for i, r in enumerate(rows):
        if not r["family"].strip() or not r["label"].strip():
            raise ProbeError(f"{path} row {i + 2}: empty family or label")
    return rows


@dataclass(frozen=True)
class Family:
    name: str
    rows: np.ndarray  # (n,) indices into the store
    task: str  # classification | regression
    labels: tuple[str, ...]  # sorted distinct labels (classification)
    label_ids: np.ndarray  # (n,) index into labels
    values: np.ndarray  # (n,) regression targets (nan for classification)
    programs: np.ndarray  # (n,) str


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    family: str
    label: str | None  # None: the regression concept of its family
    label_id: int | None


def families_of(store: FeatureStore, wanted: list[str] | None = None) -> list[Family]:
    present = list(dict.fromkeys(store.family.tolist()))
    if wanted:
        unknown = [f for f in wanted if f not in present]
        if unknown:
            raise ProbeError(f"no family {', '.join(map(repr, unknown))} in {store.directory}; "
                             f"it has: {', '.join(present)}")
        present = [f for f in present if f in wanted]
    out = []
    for name in present:
        rows = np.flatnonzero(store.family == name)
        has_value = np.isfinite(store.value[rows])
        if has_value.any() and not has_value.all():
            raise ProbeError(f"family {name!r}: {int(has_value.sum())} of {len(rows)} rows carry a value; "
                             "a regression family needs a value on every row, a label family on none")
        uniq, ids = np.unique(store.label[rows], return_inverse=True)
        labels = [str(lab) for lab in uniq]
        task = "regression" if has_value.all() else "classification"
        if task == "classification" and len(labels) < 2:
            raise ProbeError(f"family {name!r} has a single label {labels[0]!r}; one-vs-rest probes need "
                             "at least two labels in a family")
        if task == "regression" and np.ptp(store.value[rows]) == 0:
            raise ProbeError(f"family {name!r}: every clip has the value {store.value[rows][0]}; nothing to regress")
        out.append(Family(name, rows, task, tuple(labels), ids, store.value[rows], store.program[rows]))
    return out


def concept_name(family: str, label: str | None = None) -> str:
    raw = family if label is None else f"{family}-{label}"
    name = _BAD.sub("-", raw).lstrip("-_+#")
    if not name:
        raise ProbeError(f"cannot make a concept name from family {family!r} and label {label!r}")
    return name


def concepts_of(families: list[Family]) -> list[ConceptSpec]:
    specs, seen = [], {}
    for fam in families:
        items = [(None, None)] if fam.task == "regression" else list(enumerate(fam.labels))
        for label_id, label in items:
            name = concept_name(fam.name, label)
            where = f"{fam.name}/{label}" if label is not None else fam.name
            if name in seen:
                raise ProbeError(f"{where} and {seen[name]} both map to the concept name {name!r}; rename one")
            seen[name] = where
            specs.append(ConceptSpec(name, fam.name, label, label_id))
    return specs


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # positions within the family
    val: np.ndarray
    grouped: bool  # whole programs held out of training
    note: str


def strata(fam: Family) -> np.ndarray:
    if fam.task == "classification":
        return fam.label_ids
    edges = np.quantile(fam.values, [0.2, 0.4, 0.6, 0.8])
    return np.searchsorted(edges, fam.values, side="right")


def split_family(fam: Family, val_fraction: float, seed: int) -> Split:
    if not 0.0 < val_fraction < 1.0:
        raise ProbeError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    s = strata(fam)
    counts = np.bincount(s)
    if fam.task == "classification" and counts.min() < 2:
        lab = fam.labels[int(np.argmin(counts))]
        raise ProbeError(f"label {lab!r} of family {fam.name!r} has {counts.min()} clip; every label needs at "
                         "least 2 (one to train on, one to validate)")
    rng = np.random.default_rng([seed, zlib.crc32(fam.name.encode())])
    programs = np.unique(fam.programs[fam.programs != ""])
    if len(programs) >= 2 and (fam.programs != "").all():
        order = rng.permutation(programs)
        per = {p: int((fam.programs == p).sum()) for p in order}
        held, total = [], 0
        for p in order:
            if total >= val_fraction * len(s):
                break
            held.append(p)
            total += per[p]
        is_val = np.isin(fam.programs, held)
        if len(held) < len(programs) and all(
                is_val[s == k].any() and (~is_val[s == k]).any() for k in np.unique(s)):
            return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), True,
                         f"{len(held)} of {len(programs)} programs held out for validation")
        note = "holding programs out left a stratum without clips on one side; split stratified by clip"
    else:
        note = "fewer than two programs (or rows without one); split stratified by clip"
    val = []
    for k in np.unique(s):
        idx = rng.permutation(np.flatnonzero(s == k))
        n_val = min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        val.extend(idx[:n_val].tolist())
    is_val = np.zeros(len(s), dtype=bool)
    is_val[val] = True
    return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), False, note)
