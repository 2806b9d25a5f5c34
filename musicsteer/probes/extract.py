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

Store (`<out>/`):
  pooled.npy   float32 [L, N, D] (a .npy memmap, filled clip by clip)
  index.csv    clip,family,label,value,program in the manifest's order
  done.npy     bool [N]: rows already extracted (re-running resumes)
  meta.json    model id and shape, conditioning, layout, hook point, dataset
  frames/      with --per-frame: <row>.npy float16 [L, T, D] per clip
"""

from __future__ import annotations

import csv
import json
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
    batch: int = 8
    point: str = "out"  # the hook point extracted: out (residual stream) or attn (self-attention output)

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ExtractError(f"hook point {self.point!r}; use {' or '.join(POINTS)}")


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


def extract(model: LoadedModel, dataset: Path, out: Path, settings: ExtractSettings = ExtractSettings(),
            progress: bool = True) -> Path:
    import soundfile as sf
    from tqdm import tqdm

    rows = read_manifest(dataset)
    if not rows:
        raise ExtractError(f"{dataset}/manifest.csv lists no clips")
    cfg, codec = model.cfg, model.codec
    L, D, N = cfg.layers, cfg.hidden, len(rows)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": {"id": model.model_id, "layers": L, "hidden": D}, "dataset": str(dataset), "clips": N,
            "conditioning": {"prompt": settings.prompt if settings.text else None, "cfg_batch": True,
                             "row": "conditional"},
            "layout": "delay" if settings.delay else "flat", "point": settings.point,
            "pooling": "mean over positions 1..P-1"}
    pooled_path, done_path = out / "pooled.npy", out / "done.npy"
    if (out / "meta.json").exists():
        old = json.loads((out / "meta.json").read_text())
        old.setdefault("point", "out")  # stores from before the option
        if old != meta:
            raise ExtractError(f"{out} holds an extraction with other settings ({old['model']['id']}, "
                               f"{old['layout']}, point {old['point']}); use a new directory")
        pooled = np.load(pooled_path, mmap_mode="r+")
        done = np.load(done_path, mmap_mode="r+")
    else:
        pooled = np.lib.format.open_memmap(pooled_path, mode="w+", dtype=np.float32, shape=(L, N, D))
        done = np.lib.format.open_memmap(done_path, mode="w+", dtype=bool, shape=(N,))
        with open(out / "index.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["clip", "family", "label", "value", "program"])
            for r in rows:
                w.writerow([r["clip"], r["family"], r["label"], r.get("value", "") if r.get("value") is not None
                            else "", r["program"]])
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if settings.per_frame:
        (out / "frames").mkdir(exist_ok=True)
    todo = [i for i in range(N) if not done[i]]
    for start in tqdm(range(0, len(todo), settings.batch), desc="extract", unit="batch", disable=not progress):
        chunk = todo[start:start + settings.batch]
        seqs = []
        for i in chunk:
            path = dataset / rows[i]["clip"]
            try:
                audio, rate = sf.read(path, dtype="float32", always_2d=True)
            except (OSError, RuntimeError) as exc:
                raise ExtractError(f"cannot read {path}: {exc}") from exc
            if rate != codec.sample_rate:
                raise ExtractError(f"{path} is {rate} Hz; the codec takes {codec.sample_rate} Hz")
            codes = codec.encode(audio.mean(axis=1), cfg.codebooks)
            seqs.append(layout(codes, cfg.special_token, settings.delay))
        length = min(s.shape[1] for s in seqs)  # clips of one dataset share a length; trim stragglers
        states = hidden_states(model, torch.stack([s[:, :length] for s in seqs]), settings)  # (L, n, P, D)
        mean = states[:, :, 1:].float().mean(dim=2).cpu().numpy()  # (L, n, D)
        for j, i in enumerate(chunk):
            pooled[:, i] = mean[:, j]
            if settings.per_frame:
                np.save(out / "frames" / f"{i}.npy", states[:, j, 1:].to(torch.float16).cpu().numpy())
        pooled.flush()
        done[chunk] = True
        done.flush()
    return out
