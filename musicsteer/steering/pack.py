"""Concept packs: a directory with `directions.safetensors` and `concepts.json`.

`directions.safetensors` holds, per concept NAME, `NAME.directions` ([layers, hidden]
unit rows, float32), `NAME.scores` ([layers], the per-layer validation score) and,
optionally, `NAME.targets` ([layers], the projection a clamp moves toward).
`concepts.json` says what model shape the pack was trained on, the method and its
hyper-parameters, the sign convention, and a summary of the data.

A pack knows nothing of the decoder: `check_fits` compares shapes only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MusicsteerError
from ..model.config import ModelConfig

FORMAT = 1
SIGN = "a positive projection on a direction means the concept is present"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+#\-]*$")


class PackError(MusicsteerError):
    pass


@dataclass(frozen=True)
class Concept:
    name: str
    directions: torch.Tensor  # (L, D) unit rows
    scores: torch.Tensor  # (L,)
    targets: torch.Tensor | None = None  # (L,)

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise PackError(f"concept name {self.name!r}: use letters, digits, '_', '-', '+', '#'")
        L = self.directions.shape[0]
        if self.directions.ndim != 2 or self.scores.shape != (L,):
            raise PackError(f"concept {self.name!r}: directions must be [layers, hidden] and scores [layers]")
        if self.targets is not None and self.targets.shape != (L,):
            raise PackError(f"concept {self.name!r}: targets must be [layers]")
        norms = self.directions.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise PackError(f"concept {self.name!r}: directions are not unit vectors "
                            f"(norms {norms.min():.3g}..{norms.max():.3g})")


@dataclass
class ConceptPack:
    concepts: dict[str, Concept]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.concepts)

    def check_fits(self, cfg: ModelConfig) -> None:
        model = self.meta.get("model", {})
        layers, hidden = model.get("layers"), model.get("hidden")
        if (layers, hidden) != (cfg.layers, cfg.hidden):
            raise PackError(
                f"concept pack was made for {model.get('id', 'a model')} with {layers} layers x {hidden} hidden; "
                f"this model has {cfg.layers} layers x {cfg.hidden} hidden")

    def __getitem__(self, name: str) -> Concept:
        try:
            return self.concepts[name]
        except KeyError:
            raise PackError(f"no concept {name!r} in this pack; it has: {', '.join(self.names) or 'none'}") from None

    # -- files ----------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for c in self.concepts.values():
            tensors[f"{c.name}.directions"] = c.directions.float().contiguous()
            tensors[f"{c.name}.scores"] = c.scores.float().contiguous()
            if c.targets is not None:
                tensors[f"{c.name}.targets"] = c.targets.float().contiguous()
        meta = dict(self.meta, format=FORMAT, concepts=[
            dict(self.meta.get("concept_info", {}).get(n, {}), name=n) for n in self.names])
        meta.pop("concept_info", None)
        save_file(tensors, str(directory / "directions.safetensors"))
        (directory / "concepts.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path | str) -> "ConceptPack":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ..models import embedded_pack

        directory = embedded_pack(directory) or Path(directory)  # `--concepts demo`: the shipped pack
        meta_file, tensor_file = directory / "concepts.json", directory / "directions.safetensors"
        for f in (meta_file, tensor_file):
            if not f.exists():
                raise PackError(f"{directory} is not a concept pack: {f.name} is missing")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PackError(f"cannot read {meta_file}: {exc}") from exc
        try:
            tensors = load_file(str(tensor_file))
        except (OSError, SafetensorError) as exc:
            raise PackError(f"cannot read {tensor_file}: {str(exc).splitlines()[0]}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
            raise PackError(f"{meta_file}: not a format-{FORMAT} concept pack description")
        concepts = {}
        for entry in meta.get("concepts", []):
            name = entry.get("name") if isinstance(entry, dict) else None
            if f"{name}.directions" not in tensors or f"{name}.scores" not in tensors:
                raise PackError(f"{tensor_file}: concept {name!r} listed in concepts.json has no tensors")
            concepts[name] = Concept(name, tensors[f"{name}.directions"], tensors[f"{name}.scores"],
                                     tensors.get(f"{name}.targets"))
        pack = cls(concepts, meta)
        for c in concepts.values():
            if c.directions.shape != (meta["model"]["layers"], meta["model"]["hidden"]):
                raise PackError(f"{tensor_file}: concept {c.name!r} has shape {tuple(c.directions.shape)}, "
                                f"concepts.json says {meta['model']['layers']} x {meta['model']['hidden']}")
        return pack

    # -- making packs without probes ---------------------------------------------------------

    @classmethod
    def made(cls, cfg: ModelConfig, model_id: str, random: list[str], vectors: dict, seed: int = 0) -> "ConceptPack":
        """A pack before probes are trained: concepts `random` with seeded random directions and
        concepts from `vectors` (names distinct, at least one concept)."""
        pack = cls.random(random, cfg, model_id, seed=seed) if random else None
        if vectors:
            given = cls.from_vectors(vectors, cfg, model_id)
            pack = given if pack is None else cls({**pack.concepts, **given.concepts},
                                                  dict(pack.meta, method="random+user"))
        return pack

    @classmethod
    def from_vectors(cls, vectors: dict[str, np.ndarray | torch.Tensor], cfg: ModelConfig, model_id: str,
                     method: str = "user", hyper: dict | None = None) -> "ConceptPack":
        """Directions given by the user: one vector [hidden] (used at every layer) or [layers, hidden]."""
        concepts = {}
        for name, vec in vectors.items():
            v = torch.as_tensor(np.asarray(vec), dtype=torch.float32)
            if v.shape == (cfg.hidden,):
                v = v.expand(cfg.layers, -1)
            if v.shape != (cfg.layers, cfg.hidden):
                raise PackError(f"vector for {name!r} has shape {tuple(v.shape)}; expected [{cfg.hidden}] or "
                                f"[{cfg.layers}, {cfg.hidden}]")
            norms = v.norm(dim=-1, keepdim=True)
            if not torch.isfinite(v).all() or (norms == 0).any():
                raise PackError(f"vector for {name!r} has zero or non-finite rows")
            concepts[name] = Concept(name, (v / norms).contiguous(), torch.ones(cfg.layers))
        meta = {"model": {"id": model_id, "layers": cfg.layers, "hidden": cfg.hidden},
                "method": method, "hyperparameters": hyper or {}, "sign": SIGN,
                "data": {"summary": "directions given directly, not learned from data"}}
        return cls(concepts, meta)

    @classmethod
    def random(cls, names: list[str], cfg: ModelConfig, model_id: str, seed: int = 0) -> "ConceptPack":
        """Random unit directions, for trying the steering path before probes exist."""
        gen = torch.Generator().manual_seed(seed)
        vectors = {name: torch.randn(cfg.layers, cfg.hidden, generator=gen) for name in names}
        return cls.from_vectors(vectors, cfg, model_id, method="random", hyper={"seed": seed})
