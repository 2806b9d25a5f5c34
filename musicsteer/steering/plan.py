"""Threading model: `SteeringPlan.set_*` may be called from any thread (they store a
value under a lock); `write(step)` runs on the producer thread before each step and
is the only writer of the device buffers.

Steering in the decoder: device buffers and hooks (`Steerer`), and the host-side
plan that fills the strength buffer each step (`SteeringPlan`).

Per hooked layer l, batch row r and concept k, at step t:
    alpha[l, r, k] = strength_k * schedule_k(t) * weight[l, k] * gate(t) * row[r]
`weight` comes from the concepts' per-layer validation scores (score-weighted,
top-K, or all layers); `gate(t)` is one seeded draw per step shared by all layers
(on with probability p); `row` picks both CFG branches or the conditional one.

The buffers (`alpha` [L, B, K], `directions` [L, K, D], `targets` [L, K]) are
allocated once on the model's device and only ever written in place, so a step
captured in a CUDA graph replays with new strengths without recapture. The hooks
are `SteeringHook`s (steering/hooks.py) in the settings' registered mode
(steering/modes.py); at their points they run before any observer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..model.musicgen import MusicGen
from . import modes
from .hooks import SteeringHook
from .schedules import Constant

POINTS = ("out", "attn")
ROWS = ("both", "cond")


@dataclass(frozen=True)
class SteeringSettings:
    mode: str = "add"  # a registered steering mode (steering/modes.py): add | norm | clamp | ablate
    rows: str = "both"  # both CFG branches, or the conditional one only
    point: str = "out"  # residual stream after the block, or the self-attention output
    layers: str = "weighted"  # weighted | top:K | all
    kappa: float = 0.95  # weighted: w = minmax(score) ** (1 / kappa)
    gate: float = 1.0  # probability per step that steering is applied
    seed: int = 0

    def __post_init__(self) -> None:
        modes.get(self.mode)  # validates against the registry
        if self.rows not in ROWS:
            raise ValueError(f"steered rows {self.rows!r}; use both or cond")
        if self.point not in POINTS:
            raise ValueError(f"hook point {self.point!r}; use out or attn")
        if not 0.0 <= self.gate <= 1.0:
            raise ValueError(f"gate probability must be in [0, 1], got {self.gate}")
        if not self.kappa > 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        self.top_k()  # validates the layers spec

    def top_k(self) -> int | None:
        if self.layers in ("weighted", "all"):
            return None
        kind, _, n = self.layers.partition(":")
        if kind != "top" or not n.isdigit() or int(n) < 1:
            raise ValueError(f"layer selection {self.layers!r}; use weighted, all, or top:K")
        return int(n)


def layer_weights(scores: np.ndarray, settings: SteeringSettings) -> np.ndarray:
    """Per-layer weights (L,) from validation scores (L,)."""
    scores = np.asarray(scores, dtype=np.float64)
    top = settings.top_k()
    if top is not None:
        w = np.zeros_like(scores)
        w[np.argsort(-scores, kind="stable")[:top]] = 1.0
        return w
    if settings.layers == "all":
        return np.ones_like(scores)
    lo, hi = scores.min(), scores.max()
    if hi - lo <= 1e-12:
        return np.ones_like(scores)
    return ((scores - lo) / (hi - lo)) ** (1.0 / settings.kappa)


def gate_open(step: int, settings: SteeringSettings) -> bool:
    """The step's gate: a function of (seed, step) alone, so replay and lookahead agree."""
    if settings.gate >= 1.0:
        return True
    return bool(np.random.default_rng([settings.seed, step]).random() < settings.gate)


class Steerer:
    """Device-side buffers and the hooks that read them."""

    def __init__(self, decoder: MusicGen, directions: torch.Tensor, targets: torch.Tensor,
                 layer_mask: np.ndarray, settings: SteeringSettings, batch: int) -> None:
        L, K, D = directions.shape
        assert L == decoder.cfg.layers and D == decoder.cfg.hidden
        p = decoder.embed.weight
        self.decoder, self.settings = decoder, settings
        self.mode = modes.get(settings.mode)
        self.directions = directions.to(device=p.device, dtype=p.dtype).contiguous()  # (L, K, D)
        self.targets = targets.to(device=p.device, dtype=torch.float32).contiguous()  # (L, K)
        self.alpha = torch.zeros((L, batch, K), dtype=torch.float32, device=p.device)  # (L, B, K)
        self.layers = [i for i in range(L) if layer_mask[i]]  # layers with any weight: the only hooks
        self.attached = False
        self._hooks: dict = {}

    def attach(self) -> "Steerer":
        if self.attached:
            return self
        for i in self.layers:
            hook = SteeringHook(self.alpha[i], self.directions[i], self.targets[i], self.mode)
            self.decoder.add_hook(f"blocks.{i}.{self.settings.point}", hook)
            self._hooks[i] = hook
        self.attached = True
        return self

    def detach(self) -> None:
        for i, hook in self._hooks.items():
            self.decoder.remove_hook(f"blocks.{i}.{self.settings.point}", hook)
        self._hooks = {}
        self.attached = False

    def __enter__(self) -> "Steerer":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


class SteeringPlan:
    """Strengths, schedules, layer weights, gate and rows -> the alpha buffer, per step."""

    def __init__(self, names: list[str], scores: np.ndarray, settings: SteeringSettings, batch: int) -> None:
        """`scores` (K, L): each concept's per-layer validation scores."""
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.settings = settings
        self.scores = np.asarray(scores, dtype=np.float64)  # (K, L)
        self.weights = np.stack([layer_weights(s, settings) for s in scores], axis=1).astype(np.float32)  # (L, K)
        rows = np.ones(batch, dtype=np.float32)
        if settings.rows == "cond":
            rows[1:] = 0.0
        self.rows = rows  # (B,)
        self.strengths = np.zeros(len(self.names), dtype=np.float32)
        self.schedules: list = [Constant(1.0)] * len(self.names)
        self._lock = threading.Lock()
        self._host = torch.zeros((self.weights.shape[0], batch, len(self.names)), dtype=torch.float32)

    def concept(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"no concept {name!r}; loaded: {', '.join(self.names) or 'none'}") from None

    def set_strength(self, name: str, value: float) -> None:
        k = self.concept(name)
        with self._lock:
            self.strengths[k] = value

    def set_schedule(self, name: str, schedule) -> None:
        k = self.concept(name)
        with self._lock:
            self.schedules[k] = schedule

    def concept_strengths(self, step: int) -> np.ndarray:
        """Strength x schedule x gate per concept at `step`, (K,)."""
        with self._lock:
            s = np.array([self.strengths[k] * self.schedules[k](step) for k in range(len(self.names))],
                         dtype=np.float32)
        return s if gate_open(step, self.settings) else np.zeros_like(s)

    def alpha(self, step: int) -> np.ndarray:
        """(L, B, K) strengths for every layer, row and concept at `step`."""
        s = self.concept_strengths(step)
        return self.weights[:, None, :] * self.rows[None, :, None] * s[None, None, :]

    def write(self, step: int, steerer: Steerer) -> None:
        """Fill the steerer's device buffer in place for `step` (producer thread)."""
        self._host.numpy()[:] = self.alpha(step)
        # _host is pageable on purpose: the copy has left it when copy_ returns, so the next write
        # cannot race a queued transfer. Pinning it would need two buffers and an event.
        steerer.alpha.copy_(self._host, non_blocking=True)


def build_steering(decoder: MusicGen, pack, settings: SteeringSettings, batch: int,
                   names: list[str] | None = None) -> tuple[Steerer, SteeringPlan]:
    """Steerer and plan for the concepts `names` of a concept pack (all by default)."""
    pack.check_fits(decoder.cfg)
    names = names or pack.names
    concepts = [pack[n] for n in names]
    scores = np.stack([c.scores.numpy() for c in concepts])  # (K, L)
    plan = SteeringPlan(names, scores, settings, batch)
    directions = torch.stack([c.directions for c in concepts], dim=1)  # (L, K, D)
    targets = torch.stack([c.targets if c.targets is not None else torch.zeros(decoder.cfg.layers)
                           for c in concepts], dim=1)  # (L, K)
    steerer = Steerer(decoder, directions, targets, plan.weights.any(axis=1), settings, batch)
    return steerer, plan
