"""Threading model: `SteeringPlan.set_*` may be called from any thread (they store a
value under a lock); `write(step)` runs on the producer thread before each step and
is the only writer of the device buffers; `recorded` and `Steerer.replaying` run on
that thread too (the window's re-prime).

Steering in the decoder: device buffers and hooks (`Steerer`), and the host-side
plan that fills the strength buffer each step (`SteeringPlan`).

Per hooked layer l, batch row r and concept k, at step t:
    alpha[l, r, k] = strength_k * schedule_k(t) * weight[l, k] * gate(t, l, k) * row[r]
`weight` comes from the concepts' per-layer validation scores (score-weighted,
top-K, or all layers); the gate is on with probability p, drawn from (seed, step):
once per step for every layer and concept (`gate_per="step"`), or independently per
layer and concept at every step (`gate_per="layer"`, MusicRFM's code: one draw per
hooked layer per forward, and per direction when several are summed). Both keep the
mean strength; the per-step gate is burstier (all layers on or off together).
`row` picks both CFG branches or the conditional one. A strength outside the mode's
range (steering/modes.py) is clamped to it, with a log line.

`write(step)` also keeps the alpha each step used (`keep_history`), so the window's
re-prime recomputes a position with the strengths it was generated with.

The buffers (`alpha` [L, B, K], `directions` [L, K, D], `targets` [L, K]) are
allocated once on the model's device and only ever written in place, so a step
captured in a CUDA graph replays with new strengths without recapture. The hooks
are `SteeringHook`s (steering/hooks.py) in the settings' registered mode
(steering/modes.py); at their points they run before any observer.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..model.musicgen import MusicGen
from . import modes
from .hooks import SteeringHook
from .schedules import Constant

log = logging.getLogger("musicsteer.steering")

POINTS = ("out", "attn")
ROWS = ("both", "cond")
GATE_PER = ("step", "layer")


@dataclass(frozen=True)
class SteeringSettings:
    mode: str = "add"  # a registered steering mode (steering/modes.py): add | norm | clamp | ablate
    rows: str = "both"  # both CFG branches, or the conditional one only
    point: str = "out"  # residual stream after the block, or the self-attention output
    layers: str = "weighted"  # weighted | top:K | all
    kappa: float = 0.95  # weighted: w = minmax(score) ** (1 / kappa)
    gate: float = 1.0  # probability that steering is applied (per step, or per layer and concept)
    seed: int = 0
    gate_per: str = "step"  # one gate draw per step, or one per layer and concept at every step

    def __post_init__(self) -> None:
        modes.get(self.mode)  # validates against the registry
        if self.rows not in ROWS:
            raise ValueError(f"steered rows {self.rows!r}; use both or cond")
        if self.point not in POINTS:
            raise ValueError(f"hook point {self.point!r}; use out or attn")
        if self.gate_per not in GATE_PER:
            raise ValueError(f"gate draws per {self.gate_per!r}; use step or layer")
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
    """The step's gate (`gate_per="step"`): a function of (seed, step) alone, so replay and
    lookahead agree."""
    if settings.gate >= 1.0:
        return True
    return bool(np.random.default_rng([settings.seed, step]).random() < settings.gate)


def gate_mask(step: int, settings: SteeringSettings, shape: tuple[int, int]) -> np.ndarray:
    """The per-layer gate (`gate_per="layer"`): (L, K) independent draws, a function of (seed, step)."""
    if settings.gate >= 1.0:
        return np.ones(shape, dtype=np.float32)
    draws = np.random.default_rng([settings.seed, step, 1]).random(shape)  # (L, K)
    return (draws < settings.gate).astype(np.float32)


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

    @contextmanager
    def replaying(self, alphas: np.ndarray):
        """Inside the block, a forward over T positions steers position t with `alphas[:, :, t]`
        ((L, B, T, K), the strengths recorded for those positions) instead of the buffer; a
        one-position forward reads the buffer, which holds that position's strengths meanwhile."""
        L, B, T, K = alphas.shape
        saved = self.alpha.clone()
        if T == 1 or (alphas == alphas[:, :, :1]).all():
            self.alpha.copy_(torch.from_numpy(np.ascontiguousarray(alphas[:, :, 0])))
            per = None
        else:
            per = torch.from_numpy(np.ascontiguousarray(alphas)).to(self.alpha.device)  # (L, B, T, K)
        try:
            for i, hook in self._hooks.items():
                hook.positions = None if per is None else per[i]
            yield
        finally:
            for hook in self._hooks.values():
                hook.positions = None
            self.alpha.copy_(saved)

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
        self.mode = modes.get(settings.mode)
        self.strengths = np.zeros(len(self.names), dtype=np.float32)
        self.schedules: list = [Constant(1.0)] * len(self.names)
        self._lock = threading.Lock()
        self._host = torch.zeros((self.weights.shape[0], batch, len(self.names)), dtype=torch.float32)
        self._clamped: set[int] = set()  # concepts whose last strength was clamped (logged once)
        self._history: np.ndarray | None = None  # (R, L, B, K): the alpha of step t at t % R
        self._stamps: np.ndarray | None = None  # (R,): which step each slot holds (-1: none)

    def concept(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"no concept {name!r}; loaded: {', '.join(self.names) or 'none'}") from None

    def set_strength(self, name: str, value: float) -> None:
        """Set a concept's strength; one outside the mode's range is clamped to it, with a log line."""
        k = self.concept(name)
        why = self.mode.out_of_range(float(value))
        if why is not None:
            value = self.mode.clamp(value)
            if k not in self._clamped:  # once until it is back in range (a smoothed ramp sets it every step)
                log.warning("concept %s: %s; clamped to %g", name, why, value)
            self._clamped.add(k)
        else:
            self._clamped.discard(k)
        with self._lock:
            self.strengths[k] = value

    def set_schedule(self, name: str, schedule) -> None:
        k = self.concept(name)
        with self._lock:
            self.schedules[k] = schedule

    def concept_strengths(self, step: int) -> np.ndarray:
        """Strength x schedule per concept at `step`, within the mode's range, times the step's
        gate when it is drawn per step, (K,)."""
        lo, hi = self.mode.strengths
        with self._lock:
            s = np.array([min(max(self.strengths[k] * self.schedules[k](step), lo), hi)
                          for k in range(len(self.names))], dtype=np.float32)
        if self.settings.gate_per == "layer":
            return s
        return s if gate_open(step, self.settings) else np.zeros_like(s)

    def alpha(self, step: int) -> np.ndarray:
        """(L, B, K) strengths for every layer, row and concept at `step`."""
        s = self.concept_strengths(step)
        alpha = self.weights[:, None, :] * self.rows[None, :, None] * s[None, None, :]
        if self.settings.gate_per == "layer":
            alpha = alpha * gate_mask(step, self.settings, self.weights.shape)[:, None, :]
        return alpha

    def keep_history(self, steps: int) -> None:
        """Keep the alpha of the last `steps` steps written (allocated once, here)."""
        self._history = np.zeros((steps, *self._host.shape), dtype=np.float32)  # (R, L, B, K)
        self._stamps = np.full(steps, -1, dtype=np.int64)

    def recorded(self, first: int, n: int) -> np.ndarray:
        """The alpha steps first..first+n-1 were written with, (L, B, n, K); a step not kept (before
        the first write, or too old) reads as unsteered."""
        assert self._history is not None, "keep_history() first"
        steps = np.arange(first, first + n)
        slots = steps % len(self._stamps)
        out = self._history[slots] * (self._stamps[slots] == steps)[:, None, None, None]  # (n, L, B, K)
        return out.transpose(1, 2, 0, 3)

    def write(self, step: int, steerer: Steerer) -> None:
        """Fill the steerer's device buffer in place for `step` (producer thread)."""
        self._host.numpy()[:] = self.alpha(step)
        if self._history is not None:
            slot = step % len(self._stamps)
            self._history[slot] = self._host.numpy()
            self._stamps[slot] = step
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
