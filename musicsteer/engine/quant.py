"""Reduced-precision weights: int8 per output channel, for the CPU step.

`quantize_int8(decoder)` replaces the decoder's linear layers (blocks and heads) by
`Int8Linear`: weights stored as int8 with one bfloat16 scale per output row
(symmetric, round to nearest), products by torch's `_weight_int8pack_mm` on bfloat16
activations. A step then reads a quarter of the float32 bytes. It is an option, not
the default: tokens differ from the float32 model's, so parity tests stay float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)  # (rows, out) bfloat16
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every bias-free `Linear` below `module` by an `Int8Linear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, Linear) and child.bias is None:
            setattr(module, name, Int8Linear(child.weight))
        else:
            quantize_int8(child)
    return module
