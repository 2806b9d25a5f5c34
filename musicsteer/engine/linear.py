"""The decoder's linear layer: `nn.Linear` with a CPU fast path for the one-token step.

For a handful of rows (the CFG batch of two, one position) in float32 on CPU, MKL's
`x @ W.T` falls off its fast path, while the same product written as `(W @ x.T).T`
streams the weight once at close to the memory bandwidth (measured on the 2-core
test machines: 24-32 GB/s against 8-24 GB/s for `F.linear`, 1.5x faster for a whole
`small` step). Prefill and other dtypes use `F.linear`. The weight layout is the
standard one, so loading and the state dict are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 4


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() <= FEW_ROWS * D:
            # x must be row-major so that x.T is a transposed view: MKL takes a contiguous (D, rows)
            # operand off its fast path (6 GB/s); copying 2 x D floats costs nothing next to W.
            y = (self.weight @ x.reshape(-1, D).contiguous().T).T  # (rows, out), a transposed view
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class ChunkedLinear(nn.Module):
    """A bias-free linear layer wider than it is tall (the MLP's second projection), stored as
    square column blocks (k, out, in/k) and applied as one batched product summed over blocks.

    For a few float32 rows on CPU, MKL streams a (1024, 4096) weight at 16-18 GB/s and the
    same bytes as four (1024, 1024) blocks in one `bmm` at about 29 GB/s (2-core test machines).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out, inp = weight.shape
        k = inp // out
        assert k >= 2 and inp % out == 0, "ChunkedLinear is for weights k times wider than tall"
        blocks = weight.detach().view(out, k, out).transpose(0, 1).contiguous()  # (k, out, out)
        self.register_buffer("blocks", blocks)
        self.in_features, self.out_features, self.k = inp, out, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.k, self.out_features).transpose(0, 1).contiguous()  # (k, rows, c)
        y = torch.bmm(self.blocks, flat.transpose(1, 2)).sum(0).T  # (rows, out), as W @ x.T (see Linear)
        return y.reshape(*x.shape[:-1], self.out_features)


def optimize_for_cpu(module: nn.Module) -> nn.Module:
    """Swap wide float32 layers for `ChunkedLinear`, in place (CPU one-token steps)."""
    for name, child in list(module.named_children()):
        if (isinstance(child, Linear) and child.bias is None and child.weight.dtype == torch.float32
                and child.in_features % child.out_features == 0 and child.in_features >= 2 * child.out_features):
            setattr(module, name, ChunkedLinear(child.weight))
        else:
            optimize_for_cpu(child)
    return module
