"""The Triton steering kernel: one pass over each hidden vector applies every active
concept, with per-row (CFG branch) strengths. Same arithmetic as `reference.py`; MODE
is the kernel id of kernels/ids.py (0 add, 1 norm, 2 clamp, 3 ablate).

One program steers one (row, position) vector, in chunks of BLOCK_D features, with
all K concepts in one tile: the first loop gathers |x|^2 (NORM) or the projections
<x, v_k> (CLAMP, ABLATE), which the update needs first; the second writes the result
in place as y = scale * (x + sum_k coef_k v_k).
It reads the strength buffer on the device, so a captured CUDA graph picks up new
strengths without recapture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _steer_kernel(h_ptr, alpha_ptr, v_ptr, c_ptr, T, D, K,
                  stride_hb, stride_ht, stride_ab, stride_vk,
                  MODE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.program_id(1)
    h_row = h_ptr + row * stride_hb + pos * stride_ht
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    a = tl.load(alpha_ptr + row * stride_ab + ks, mask=kmask, other=0.0).to(tl.float32)  # (BK,)

    coef = a  # ADD: the coefficient of v_k is a_k
    scale = 1.0
    if MODE != 0:
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        proj = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c in range(CHUNKS):
            ds = c * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = ds < D
            x = tl.load(h_row + ds, mask=dmask, other=0.0).to(tl.float32)
            sq += x * x
            if MODE >= 2:
                v = tl.load(v_ptr + ks[:, None] * stride_vk + ds[None, :],
                            mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                proj += tl.sum(v * x[None, :], axis=1)
        if MODE == 1:  # NORM: (x + |x| sum a v) / (1 + sum |a|)
            coef = a * tl.sqrt(tl.sum(sq, axis=0))
            scale = 1.0 / (1.0 + tl.sum(tl.abs(a), axis=0))
        elif MODE == 2:  # CLAMP: x + sum a (c - <x, v>) v
            target = tl.load(c_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            coef = a * (target - proj)
        else:  # ABLATE: x - sum a <x, v> v
            coef = -(a * proj)

    for c in range(CHUNKS):
        ds = c * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = ds < D
        x = tl.load(h_row + ds, mask=dmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + ks[:, None] * stride_vk + ds[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        y = x + tl.sum(coef[:, None] * v, axis=0)
        if MODE == 1:
            y = y * scale
        tl.store(h_row + ds, y.to(h_ptr.dtype.element_ty), mask=dmask)


def steer_triton(h: torch.Tensor, alpha: torch.Tensor, directions: torch.Tensor,
                 targets: torch.Tensor | None, mode: int) -> torch.Tensor:
    """In place on h (B, T, D), last dim contiguous; alpha (B, K); directions (K, D). Returns h."""
    B, T, D = h.shape
    K = directions.shape[0]
    assert h.stride(-1) == 1 and directions.stride(-1) == 1 and alpha.stride(-1) == 1
    block_k = triton.next_power_of_2(max(K, 1))
    block_d = min(triton.next_power_of_2(D), max(16, 4096 // block_k))  # keep the (K, D) tile small
    chunks = triton.cdiv(D, block_d)
    c = targets if targets is not None else alpha  # not read unless MODE == CLAMP
    _steer_kernel[(B, T)](h, alpha, directions, c, T, D, K, h.stride(0), h.stride(1), alpha.stride(0),
                          directions.stride(0), MODE=mode, BLOCK_D=block_d, BLOCK_K=block_k, CHUNKS=chunks)
    return h
