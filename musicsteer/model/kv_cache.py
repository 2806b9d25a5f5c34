"""Threading model: the caches are read and written by the thread that runs the decoder's forward
(the producer's). A prompt worker (a thread, or a child process) may call `CrossCache.write` on
buffers it owns (never a slot's own); `install`, `fill` and every `PromptMix` method run on the
forward's thread, between forwards.

Static key/value caches for self-attention and cross-attention.

Both are allocated once, at their maximum shape, by `setup_caches`; every step
writes into them by index. Shapes never change, so a step that uses them can be
captured in a CUDA graph. The cross-attention side holds one memory per prompt slot
and the weights that blend them (`PromptMix`). The caches know nothing of the model
around them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_SLOTS = 8  # prompt slots a decoder holds at most (the C kernel's MS_MAX_SLOTS)


class KVCache(nn.Module):
    """Self-attention keys and values for `batch` rows and `max_len` positions."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H, T, hd) at positions `input_pos` (T,); return the cache's first `upto`
        positions, or all of it (in its storage dtype, which may be narrower than the model's: see
        `MusicGen.cache_dtype`)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))  # (B, H, L, hd)
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        if upto is None:
            return self.k, self.v
        return self.k[:, :, :upto], self.v[:, :, :upto]


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension (one head's values at one position): x (..., hd) ->
    (q (..., hd) int8, scale (...) float32) with scale = max|x| / 127 and q = round(x / scale), half
    to even. The CPU kernel (kernels/cpu_gemv.c, quantize_head) does the same float32 operations."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0  # (...)
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / div[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class QuantizedKVCache(KVCache):
    """An 8-bit self-attention cache: int8 keys and values with one float32 scale per row, head and
    position (`k_scale`, `v_scale`, (B, H, L)), a quarter of float32's bytes plus 4 per head and
    position. `update` returns the filled part dequantized to `dtype` (the reference path; the CPU
    kernel reads the int8 form and its scales directly)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__(batch, heads, max_len, head_dim, torch.int8, device)
        self.dtype = dtype
        shape = (batch, heads, max_len)
        self.register_buffer("k_scale", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("v_scale", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for cache, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = quantize_heads(x)  # (B, H, T, hd), (B, H, T)
            cache.index_copy_(2, input_pos, q)
            scales.index_copy_(2, input_pos, s)
        n = self.max_len if upto is None else upto
        return (self.k[:, :, :n].to(self.dtype) * self.k_scale[:, :, :n, None].to(self.dtype),
                self.v[:, :, :n].to(self.dtype) * self.v_scale[:, :, :n, None].to(self.dtype))


class PromptMix:
    """The prompt slots every cross-attention layer reads, and their weights (one object per decoder,
    shared by its layers' CrossCaches; written by one thread at a time, the producer's).

    Slot p holds one prompt's memory; the cross-attention output is the weighted sum of the
    attention over each slot's memory (model/musicgen.py). `host` holds the normalised weights as
    Python floats (the eager paths choose their slots from it without reading a tensor);
    `weights` (P,) float32 and `lengths` (P,) int32 are the same on the device (read by the static
    step and, on CPU, by the C kernel, so a captured graph sees new weights without recapture);
    `mask` (P, 1, 1, 1, max_text) marks each slot's filled positions for the static step (an empty
    slot reads one zero key: its output is zero, never NaN).
    """

    def __init__(self, slots: int, max_text: int, device) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"prompt slots must be 1..{MAX_SLOTS}, got {slots}")
        self.slots, self.max_text = slots, max_text
        self.host: tuple[float, ...] = (1.0,) + (0.0,) * (slots - 1)
        self.lengths = [0] * slots  # text positions each slot holds (0: empty)
        self.weights = torch.zeros(slots, dtype=torch.float32, device=device)
        self.weights[0] = 1.0
        self.lengths_dev = torch.zeros(slots, dtype=torch.int32, device=device)
        self.mask = torch.zeros((slots, 1, 1, 1, max_text), dtype=torch.bool, device=device)
        self.mask[..., 0] = True
        self._staging = torch.zeros(slots, dtype=torch.float32)  # pageable: the copy has left it on return

    @property
    def single(self) -> int | None:
        """The slot read alone (weight exactly 1, the others 0), or None for a blend."""
        active = [p for p, w in enumerate(self.host) if w != 0.0]
        return active[0] if len(active) == 1 and self.host[active[0]] == 1.0 else None

    @property
    def active(self) -> list[tuple[int, float]]:
        """(slot, weight) of every slot with a non-zero weight."""
        return [(p, w) for p, w in enumerate(self.host) if w != 0.0]

    @property
    def length(self) -> int:
        """The longest memory a call reads (0 when no weighted slot holds a prompt)."""
        return max((self.lengths[p] for p, _ in self.active), default=0)

    def set_weights(self, weights) -> tuple[float, ...]:
        """Weights per slot (non-negative, any scale; normalised to sum 1). Only filled slots may
        be weighted; all zero keeps the mix as it is. Returns the normalised weights."""
        w = [float(x) for x in weights]
        if len(w) != self.slots or any(not math.isfinite(x) or x < 0 for x in w):
            raise ValueError(f"prompt weights must be {self.slots} non-negative numbers, got {weights!r}")
        empty = [p + 1 for p, x in enumerate(w) if x > 0 and self.lengths[p] == 0]
        if empty:
            raise ValueError(f"prompt slot {empty[0]} holds no prompt")
        total = sum(w)
        if total <= 0:
            return self.host
        self.host = tuple(x / total if x != total else 1.0 for x in w)
        self._staging.numpy()[:] = self.host
        self.weights.copy_(self._staging, non_blocking=True)
        return self.host

    def set_length(self, slot: int, length: int) -> None:
        if not 0 < length <= self.max_text:
            raise ValueError(f"prompt has {length} text tokens; the cache holds {self.max_text}")
        self.lengths[slot] = length
        self.lengths_dev[slot] = length
        self.mask[slot].zero_()
        self.mask[slot, ..., :length] = True


class CrossCache(nn.Module):
    """Cross-attention keys and values of the projected text states, computed once per prompt,
    one pair of buffers per prompt slot of the decoder's `PromptMix`.

    Buffers hold `max_text` positions (zeros past the prompt); the mix says how many each
    slot fills (Python ints, set when a prompt changes, never read from a tensor). A slot's
    buffers are replaced whole by `install` (a prompt built elsewhere, swapped in at a step
    boundary), or written in place when `pinned` (a captured CUDA graph baked their addresses in).
    """

    def __init__(self, batch: int, heads: int, max_text: int, head_dim: int, dtype, device,
                 mix: PromptMix | None = None) -> None:
        super().__init__()
        self.shape = (batch, heads, max_text, head_dim)
        self.dtype, self.device = dtype, device
        self.mix = mix if mix is not None else PromptMix(1, max_text, device)
        # slot 0 at once, the others when a prompt is first installed there (or all, `allocate`)
        self.keys: list[torch.Tensor | None] = [None] * self.mix.slots
        self.values: list[torch.Tensor | None] = [None] * self.mix.slots
        self.keys[0], self.values[0] = self.empty()
        self.pinned = False

    def allocate(self) -> None:
        """Buffers for every slot (before a graph is captured over them)."""
        for p in range(self.mix.slots):
            if self.keys[p] is None:
                self.keys[p], self.values[p] = self.empty()

    @property
    def max_text(self) -> int:
        return self.shape[2]

    @property
    def k(self) -> torch.Tensor:  # slot 0's (the single prompt's)
        return self.keys[0]

    @property
    def v(self) -> torch.Tensor:
        return self.values[0]

    @property
    def length(self) -> int:
        return self.mix.length

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair of zeroed buffers shaped like a slot's (to build a prompt into, off the decoding thread)."""
        return (torch.zeros(self.shape, dtype=self.dtype, device=self.device),
                torch.zeros(self.shape, dtype=self.dtype, device=self.device))

    @staticmethod
    def write(buffers: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """`k`, `v` (B, H, S, hd) into a slot-shaped pair, zeros after them."""
        bk, bv = buffers
        length = k.shape[2]
        if length > bk.shape[2]:
            raise ValueError(f"prompt has {length} text tokens; the cache holds {bk.shape[2]}")
        bk[:, :, length:].zero_()
        bv[:, :, length:].zero_()
        bk[:, :, :length].copy_(k)
        bv[:, :, :length].copy_(v)

    def install(self, slot: int, buffers: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        """Make `buffers` slot `slot`'s keys and values; returns the pair it held (to reuse). Pinned,
        the new values are copied into the slot's own buffers (stream-ordered on CUDA) instead."""
        if self.pinned:
            assert self.keys[slot] is not None, "allocate() every slot before pinning"
            self.keys[slot].copy_(buffers[0], non_blocking=True)
            self.values[slot].copy_(buffers[1], non_blocking=True)
            return buffers
        old = self.keys[slot], self.values[slot]
        self.keys[slot], self.values[slot] = buffers
        return old  # (None, None) for a slot never filled before

    def fill(self, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> None:
        """Store `k`, `v` (B, H, S, hd) for a new prompt in `slot`, in place (its length is set on the mix)."""
        if self.keys[slot] is None:
            self.keys[slot], self.values[slot] = self.empty()
        self.write((self.keys[slot], self.values[slot]), k, v)
