"""Activation extraction (`musicsteer probes extract`): dataset clips -> per-layer hidden
states of the decoder, stored on disk so probe training never runs the model again.

Each clip is encoded by EnCodec, laid out with the delay pattern and teacher-forced
through the decoder on the same CFG batch the engine generates with (conditional row:
the text prompt; unconditional row: the null text). The conditional row's residual
stream after every block (`point="out"`), or every block's self-attention output
(`point="attn"`, the other point steering hooks), is mean-pooled over the clip's
positions (all but the opening all-special position): probes trained on it give
directions, clamp targets and norms of the quantity steered at that point. MusicRFM's
layout (codes without the delay pattern, no text) is available as an option, for
comparison.

Work units: chunk k is always the manifest's rows [k * batch, (k + 1) * batch), whatever
was extracted before, and `extract_chunk` is pure: its features follow from the clips,
the model and the settings (device, dtype, layout, conditioning) alone. Clips of one
length are forwarded together and nothing is trimmed, so a clip's features do not
depend on which clips share its chunk's length. Any engine (this module's loop, or the
Ray actors of `probes.distributed`) writes the same bits for the same chunk.

Store (`<out>/`):
  pooled.npy   float32 [L, N, D] (a .npy memmap, filled chunk by chunk)
  index.csv    clip,family,label,value,program in the manifest's order
  done.npy     bool [N]: rows already extracted (re-running resumes, under either engine)
  meta.json    model id and shape, conditioning, layout, hook point, dataset, chunk size, device and dtype
  frames/      with --per-frame: <row>.npy float16 [L, T, D] per clip

One process writes the store (the driver); a chunk's rows are marked done only after
its features are flushed, so a killed run loses at most the chunks in flight.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MusicsteerError
from ..model.delay import interleave
from ..model.loading.load import LoadedModel
from ..model.text import condition_rows
from ..steering.plan import POINTS


class ExtractError(MusicsteerError):
    pass


@dataclass(frozen=True)
class ExtractSettings:
    prompt: str = "music"  # the conditioning text of the conditional row
    delay: bool = True  # the delay pattern, as in generation (False: MusicRFM's flat layout)
    text: bool = True  # condition on the prompt (False: the null text, as MusicRFM)
    per_frame: bool = False
    batch: int = 8  # clips per chunk (the work unit); fixed for a store once it is started
    point: str = "out"  # the hook point extracted: out (residual stream) or attn (self-attention output)

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ExtractError(f"hook point {self.point!r}; use {' or '.join(POINTS)}")


@dataclass(frozen=True)
class ChunkFeatures:
    """What `extract_chunk` returns for its rows, in their order."""
    pooled: np.ndarray  # (L, n, D) float32
    frames: list[np.ndarray] | None  # with per_frame: per clip (L, T, D) float16


def read_manifest(dataset: Path) -> list[dict]:
    """Rows of the dataset's manifest, validated (files present, known families and labels)."""
    from .dataset import load_manifest

    return [asdict(r) for r in load_manifest(dataset)]


def layout(codes: torch.Tensor, special: int, delay: bool) -> torch.Tensor:
    """Codes (K, F) -> the model's input sequence (K, P) with the opening special column."""
    if delay:
        return interleave(codes, special)  # (K, F + K)
    K = codes.shape[0]
    return torch.cat([torch.full((K, 1), special, dtype=codes.dtype), codes], dim=1)  # (K, F + 1)


@torch.inference_mode()
def hidden_states(model: LoadedModel, seqs: torch.Tensor, settings: ExtractSettings) -> torch.Tensor:
    """The states at `settings.point` of every block, conditional row: seqs (N, K, P) -> (L, N, P, D)."""
    decoder = model.decoder
    N, K, P = seqs.shape
    captured: list[torch.Tensor] = []
    hooks = []
    for i in range(decoder.cfg.layers):
        def grab(h, _i=i):
            captured.append(h[:N])  # the conditional rows come first
            return h
        decoder.add_hook(f"blocks.{i}.{settings.point}", grab)
        hooks.append((f"blocks.{i}.{settings.point}", grab))
    try:
        states, mask = model.text.encode(settings.prompt)
        if not settings.text:
            states, mask = torch.zeros_like(states), torch.zeros_like(mask)
        states, mask = condition_rows(states, mask, 2)  # [cond; uncond], as in generation
        decoder.setup_caches(2 * N, max_len=P, self_attention=False)
        decoder.set_condition(states.repeat_interleave(N, dim=0), mask.repeat_interleave(N, dim=0))
        device = decoder.embed.weight.device
        codes = seqs.to(device).repeat(2, 1, 1)  # (2N, K, P)
        decoder.hidden_states(codes, torch.arange(P, device=device), use_cache=False)
    finally:
        for name, hook in hooks:
            decoder.remove_hook(name, hook)
    return torch.stack(captured)  # (L, N, P, D)


def chunk_rows(n: int, batch: int) -> list[range]:
    """The work units of a store of n clips: chunk k is rows [k * batch, (k + 1) * batch)."""
    if batch < 1:
        raise ExtractError(f"the chunk size must be at least 1 (got {batch})")
    return [range(s, min(s + batch, n)) for s in range(0, n, batch)]


def model_info(model: LoadedModel) -> dict:
    """The model and compute part of meta.json: what a feature depends on besides the clip."""
    weight = model.decoder.embed.weight
    return {"model": {"id": model.model_id, "layers": model.cfg.layers, "hidden": model.cfg.hidden},
            "compute": {"device": weight.device.type, "dtype": str(weight.dtype).removeprefix("torch.")}}


def read_codes(model: LoadedModel, dataset: Path, row: dict, settings: ExtractSettings) -> torch.Tensor:
    """One clip's WAV -> EnCodec codes laid out as the decoder's input (K, P)."""
    import soundfile as sf

    path = dataset / row["clip"]
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise ExtractError(f"cannot read {path}: {exc}") from exc
    if rate != model.codec.sample_rate:
        raise ExtractError(f"{path} is {rate} Hz; the codec takes {model.codec.sample_rate} Hz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the encoder's convolutions sum in another order on more threads, which can
    try:  # flip a code at a quantizer tie; one thread makes the codes the same in every process
        codes = model.codec.encode(audio.mean(axis=1), model.cfg.codebooks)
    finally:
        torch.set_num_threads(threads)
    return layout(codes, model.cfg.special_token, settings.delay)


def extract_chunk(model: LoadedModel, dataset: Path, rows: Sequence[dict],
                  settings: ExtractSettings) -> ChunkFeatures:
    """Pooled (and with per_frame, per-position) features of `rows` (manifest dicts), in order.
    Clips of one length share a forward; clips of another length get their own."""
    seqs = [read_codes(model, Path(dataset), r, settings) for r in rows]
    L, D = model.cfg.layers, model.cfg.hidden
    pooled = np.empty((L, len(rows), D), np.float32)
    frames: list[np.ndarray | None] = [None] * len(rows)
    for length in sorted({s.shape[1] for s in seqs}):
        group = [j for j, s in enumerate(seqs) if s.shape[1] == length]
        states = hidden_states(model, torch.stack([seqs[j] for j in group]), settings)  # (L, g, P, D)
        pooled[:, group] = states[:, :, 1:].float().mean(dim=2).cpu().numpy()  # (L, g, D)
        if settings.per_frame:
            for g, j in enumerate(group):
                frames[j] = states[:, g, 1:].to(torch.float16).cpu().numpy()  # (L, P - 1, D)
    return ChunkFeatures(pooled, frames if settings.per_frame else None)


class StoreWriter:
    """The feature store of one extraction, opened (resumed) or created by the one process
    that writes it. `pending()` lists the chunks still to do; `write(k, features)` stores
    chunk k and only then marks its rows done."""

    def __init__(self, out: Path, dataset: Path, rows: list[dict], info: dict, settings: ExtractSettings) -> None:
        if not rows:
            raise ExtractError(f"{dataset}/manifest.csv lists no clips")
        self.out, self.settings = Path(out), settings
        L, D, N = info["model"]["layers"], info["model"]["hidden"], len(rows)
        self.chunks = chunk_rows(N, settings.batch)
        meta = {"model": info["model"], "dataset": str(dataset), "clips": N,
                "conditioning": {"prompt": settings.prompt if settings.text else None, "cfg_batch": True,
                                 "row": "conditional"},
                "layout": "delay" if settings.delay else "flat", "point": settings.point,
                "pooling": "mean over positions 1..P-1",
                "chunk": settings.batch, "compute": info["compute"]}
        self.out.mkdir(parents=True, exist_ok=True)
        pooled_path, done_path = self.out / "pooled.npy", self.out / "done.npy"
        if (self.out / "meta.json").exists():
            old = json.loads((self.out / "meta.json").read_text())
            old.setdefault("point", "out")  # stores from before the option
            _check_resumable(self.out, old, meta)
            self.pooled = np.load(pooled_path, mmap_mode="r+")
            self.done = np.load(done_path, mmap_mode="r+")
        else:
            self.pooled = np.lib.format.open_memmap(pooled_path, mode="w+", dtype=np.float32, shape=(L, N, D))
            self.done = np.lib.format.open_memmap(done_path, mode="w+", dtype=bool, shape=(N,))
            _write_index(self.out / "index.csv", rows)
            (self.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if settings.per_frame:
            (self.out / "frames").mkdir(exist_ok=True)

    def pending(self) -> list[int]:
        return [k for k, rows in enumerate(self.chunks) if not self.done[rows.start:rows.stop].all()]

    def write(self, k: int, features: ChunkFeatures) -> None:
        rows = self.chunks[k]
        if features.pooled.shape[1] != len(rows):
            raise ExtractError(f"chunk {k} came back with {features.pooled.shape[1]} clips, not {len(rows)}")
        self.pooled[:, rows.start:rows.stop] = features.pooled
        for j, frame in enumerate(features.frames or ()):
            np.save(self.out / "frames" / f"{rows.start + j}.npy", frame)
        self.pooled.flush()
        self.done[rows.start:rows.stop] = True  # only once the features are on disk
        self.done.flush()


def _check_resumable(out: Path, old: dict, meta: dict) -> None:
    """The store's settings must be these; `chunk` and `compute` are checked where recorded
    (stores written before they were are resumed on the rest)."""
    mismatch = [k for k in meta if (k in old or k not in ("chunk", "compute")) and old.get(k) != meta[k]]
    if "chunk" in mismatch:
        raise ExtractError(f"{out} is extracted in chunks of {old['chunk']} clips; re-run with --batch "
                           f"{old['chunk']} (or use a new directory)")
    if mismatch:
        was = old.get("model", {}).get("id", "?"), old.get("layout", "?"), old.get("compute", {})
        raise ExtractError(f"{out} holds an extraction with other settings ({was[0]}, {was[1]}"
                           + (f", {was[2].get('device')} {was[2].get('dtype')}" if was[2] else "")
                           + f"; differs in {', '.join(mismatch)}); use a new directory")


def _write_index(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "family", "label", "value", "program"])
        for r in rows:
            w.writerow([r["clip"], r["family"], r["label"], "" if r.get("value") is None else r["value"],
                        r["program"]])


def extract(model: LoadedModel, dataset: Path, out: Path, settings: ExtractSettings = ExtractSettings(),
            progress: bool = True) -> Path:
    """The local engine: every pending chunk, in order, in this process."""
    from tqdm import tqdm

    rows = read_manifest(dataset)
    store = StoreWriter(out, dataset, rows, model_info(model), settings)
    for k in tqdm(store.pending(), desc="extract", unit="chunk", disable=not progress):
        store.write(k, extract_chunk(model, dataset, [rows[i] for i in store.chunks[k]], settings))
    return Path(out)
