"""One-query attention over a static KV cache for the GPU step, reading only the filled part.

The graphed step (model/graph_step.py) has fixed shapes, so the cache is always
(B, H, Lmax, hd); masking the whole cache would read Lmax positions every step. Here
the number of filled positions is read from a device tensor (the step's position + 1),
so one captured graph serves every step and each step reads only what is filled.

Split-K ("flash decoding"): program (row*head, split) walks its share of the filled
positions in blocks with an online softmax and writes a partial (max, sum, accumulator);
a second small kernel merges the splits. Splits past the filled length do no loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, scale,
                    stride_qb, stride_kb, stride_kl, CHUNK, HD, MAX_LEN,
                    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.minimum(tl.load(len_ptr), MAX_LEN)  # never past the cache, whatever the position says
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, n)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < HD
    q = tl.load(q_ptr + bh * stride_qb + ds, mask=dmask, other=0.0).to(tl.float32) * scale
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    k_head = k_ptr + bh * stride_kb
    v_head = v_ptr + bh * stride_kb
    for start in range(lo, hi, BLOCK_N):
        ns = start + tl.arange(0, BLOCK_N)
        nmask = ns < hi
        offs = ns[:, None] * stride_kl + ds[None, :]
        k = tl.load(k_head + offs, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(nmask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_head + offs, mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        l = l * correction + tl.sum(p, axis=0)
        m = m_new
    out = bh * SPLITS + split
    tl.store(m_ptr + out + tl.arange(0, 1), m)
    tl.store(l_ptr + out + tl.arange(0, 1), l)
    tl.store(acc_ptr + out * BLOCK_D + ds, acc)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, stride_ob, HD,
                  SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    m = tl.load(m_ptr + bh * SPLITS + splits)
    l = tl.load(l_ptr + bh * SPLITS + splits)
    top = tl.max(m, axis=0)
    w = tl.where(l > 0, tl.exp(m - top), 0.0)
    ds = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + (bh * SPLITS + splits)[:, None] * BLOCK_D + ds[None, :])
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(o_ptr + bh * stride_ob + ds, o.to(o_ptr.dtype.element_ty), mask=ds < HD)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     splits: int | None = None, block_n: int = 32) -> torch.Tensor:
    """q (B, H, 1, hd); caches (B, H, Lmax, hd) with contiguous rows; `length` a one-element
    integer tensor on the caches' device (read by the kernel, never by the host). Returns
    (B, H, 1, hd) in q's dtype: softmax(q k^T / sqrt(hd)) v over the first `length` positions."""
    B, H, T, hd = q.shape
    assert T == 1 and k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride()
    assert k_cache.stride(0) == H * k_cache.stride(1), "caches must be (B, H, L, hd) with heads packed"
    max_len = k_cache.shape[2]
    if splits is None:  # about two programs per multiprocessor, a power of two for the merge
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = triton.next_power_of_2(max(1, min(triton.cdiv(2 * sms, B * H), triton.cdiv(max_len, block_n), 64)))
    chunk = triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n
    block_d = triton.next_power_of_2(hd)
    qf = q.reshape(B * H, hd)
    dev = q.device
    m = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    l = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    acc = torch.empty(B * H * splits, block_d, dtype=torch.float32, device=dev)
    _partial_kernel[(B * H, splits)](qf, k_cache, v_cache, length, m, l, acc, hd ** -0.5,
                                     qf.stride(0), k_cache.stride(1), k_cache.stride(2), chunk, hd, max_len,
                                     SPLITS=splits, BLOCK_N=block_n, BLOCK_D=block_d)
    out = torch.empty(B * H, hd, dtype=q.dtype, device=dev)
    _merge_kernel[(B * H,)](m, l, acc, out, out.stride(0), hd, SPLITS=splits, BLOCK_D=block_d)
    return out.view(B, H, 1, hd)
