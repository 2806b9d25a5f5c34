"""The delay pattern: codebook k of frame f is emitted at step f + k.

Sequence convention (shared with transformers and audiocraft): position 0 holds the
special token in every codebook; position p >= 1 holds codebook k of frame p - 1 - k,
or the special token where that frame does not exist. The model reads position p and
predicts position p + 1, so step s (reading position s) emits codebook k of frame s - k,
and frame f is complete after step f + K - 1.
"""

from __future__ import annotations

import torch


def interleave(codes: torch.Tensor, special: int) -> torch.Tensor:
    """Frames (..., K, F) -> delayed sequence (..., K, F + K), position 0 all special."""
    *lead, K, F = codes.shape
    seq = codes.new_full((*lead, K, F + K), special)
    for k in range(K):
        seq[..., k, 1 + k : 1 + k + F] = codes[..., k, :]
    return seq


def deinterleave(seq: torch.Tensor) -> torch.Tensor:
    """Delayed sequence (..., K, P) -> the complete frames it holds, (..., K, P - K)."""
    *lead, K, P = seq.shape
    frames = P - K
    if frames < 0:
        return seq.new_empty((*lead, K, 0))
    return torch.stack([seq[..., k, 1 + k : 1 + k + frames] for k in range(K)], dim=-2)


def valid_mask(step: int, codebooks: int, frames: int | None, device=None) -> torch.Tensor:
    """Which codebooks step `step` emits a real token for, (K,) bool.

    Codebook k is valid when 0 <= step - k < frames (no upper limit when frames is None).
    """
    frame = step - torch.arange(codebooks, device=device)
    ok = frame >= 0
    if frames is not None:
        ok &= frame < frames
    return ok


def steps_for(frames: int, codebooks: int) -> int:
    """Decoding steps that produce `frames` complete frames."""
    return frames + codebooks - 1
