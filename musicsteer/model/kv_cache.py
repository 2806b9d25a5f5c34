"""Static key/value caches for self-attention and cross-attention.

Both are allocated once, at their maximum shape, by `setup_caches`; every step
writes into them by index. Shapes never change, so a step that uses them can be
captured in a CUDA graph. The caches know nothing of the model around them.
"""

from __future__ import annotations

import torch
from torch import nn


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


class CrossCache(nn.Module):
    """Cross-attention keys and values of the projected text states, computed once per prompt.

    Buffers hold `max_text` positions; `length` is how many the current prompt fills
    (a Python int, set when the prompt changes, never read from a tensor). `mask`
    marks the filled positions for the static (graph) path.
    """

    def __init__(self, batch: int, heads: int, max_text: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch, heads, max_text, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("mask", torch.zeros((1, 1, 1, max_text), dtype=torch.bool, device=device), persistent=False)
        self.length = 0

    @property
    def max_text(self) -> int:
        return self.k.shape[2]

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k`, `v` (B, H, S, hd) for a new prompt."""
        length = k.shape[2]
        if length > self.max_text:
            raise ValueError(f"prompt has {length} text tokens; the cache holds {self.max_text}")
        self.k.zero_()
        self.v.zero_()
        self.k[:, :, :length].copy_(k)
        self.v[:, :, :length].copy_(v)
        self.mask.zero_()
        self.mask[..., :length] = True
        self.length = length
