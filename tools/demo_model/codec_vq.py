"""Training the residual quantizer of a transformers `EncodecModel`, in place.

transformers' EncodecModel has no training path for its quantizer: its codebooks are
buffers (`embed`, `embed_avg`, `cluster_size`) that its own `encode`/`decode` read. This
module trains exactly those buffers, so the model written by `save_pretrained` encodes
and decodes with what was learned:

- `kmeans_init`: each residual level from k-means on the encoder's outputs (what is left
  after the levels before it), at the start of the quantized phase;
- `quantize`: nearest entries level by level, the EMA update of the used levels, the
  straight-through estimator and the commitment loss;
- dead entries (EMA use under `dead_share` of an even share) restart on vectors of the
  current batch.

All randomness comes from the generator passed in (seeded per step by the trainer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def codebooks(model) -> list:
    return [layer.codebook for layer in model.quantizer.layers]


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, D, T) -> (B * T, D)."""
    return z.transpose(1, 2).reshape(-1, z.shape[1])


def nearest(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `embed` (K, D) for each row of x (N, D)."""
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed.t() + embed.pow(2).sum(1)[None]  # (N, K)
    return dist.argmin(1)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """k centroids of x (N, D): k-means++-free Lloyd from random rows, empty ones re-seeded."""
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    if centroids.shape[0] < k:  # fewer vectors than entries: repeat them, jittered
        reps = x[torch.randint(0, x.shape[0], (k - centroids.shape[0],), generator=gen)]
        centroids = torch.cat([centroids, reps + 1e-3 * torch.randn(reps.shape, generator=gen)])
    for _ in range(iters):
        idx = nearest(x, centroids)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=gen)]
    return centroids


@torch.no_grad()
def kmeans_init(model, z: torch.Tensor, iters: int, gen: torch.Generator, batch_vectors: int) -> None:
    """Fill every level's codebook from encoder outputs z (N, D), residual after residual; the
    EMA counts start at what a batch of `batch_vectors` would give."""
    residual = z
    for book in codebooks(model):
        k = book.embed.shape[0]
        centroids = kmeans(residual, k, iters, gen)
        idx = nearest(residual, centroids)
        counts = torch.bincount(idx, minlength=k).float()
        book.embed.copy_(centroids)
        book.cluster_size.copy_(counts.clamp_min(1.0) / residual.shape[0] * batch_vectors)
        book.embed_avg.copy_(centroids * book.cluster_size[:, None])
        book.inited.fill_(1.0)
        residual = residual - centroids[idx]


def quantize(model, z: torch.Tensor, levels: int, train: bool, decay: float, dead_share: float,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """z (B, D, T) through the first `levels` codebooks: (straight-through quantized z,
    commitment loss, entries restarted). With `train`, the used codebooks take an EMA step."""
    x = flat(z)  # (N, D)
    residual = x.detach()
    total = torch.zeros_like(residual)
    commit = x.new_zeros(())
    restarted = 0
    for book in codebooks(model)[:levels]:
        idx = nearest(residual, book.embed)
        q = book.embed[idx]  # (N, D)
        if train:
            restarted += _ema_step(book, residual, idx, decay, dead_share, gen)
        total = total + q
        residual = residual - q
    commit = F.mse_loss(x, total.detach())
    quantized = x + (total - x).detach()  # straight-through: the decoder's gradient reaches the encoder
    B, D, T = z.shape
    return quantized.reshape(B, T, D).transpose(1, 2), commit, restarted


@torch.no_grad()
def _ema_step(book, residual: torch.Tensor, idx: torch.Tensor, decay: float, dead_share: float,
              gen: torch.Generator | None) -> int:
    k = book.embed.shape[0]
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros_like(book.embed).index_add_(0, idx, residual)
    book.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    book.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
    n = book.cluster_size.sum()
    smoothed = (book.cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing, as EnCodec's
    book.embed.copy_(book.embed_avg / smoothed[:, None])
    dead = book.cluster_size < dead_share * n / k
    count = int(dead.sum())
    if count and gen is not None:
        picks = residual[torch.randint(0, residual.shape[0], (count,), generator=gen)]
        share = n / k
        book.embed[dead] = picks
        book.cluster_size[dead] = share
        book.embed_avg[dead] = picks * share
    return count
