"""bfloat16 weights for the CPU step: half the bytes of float32, float32 activations.

`to_bf16(decoder)` replaces the decoder's bias-free linear layers (blocks and heads) by
`PackedBf16Linear`: the weight rounded to bfloat16 (nearest even), packed in blocks of 16
outputs with two inputs per 32-bit lane on huge pages. A product rounds its float32 input
rows to bfloat16 and sums the pairs in float32 with AVX-512 BF16 (`vdpbf16ps`, one
instruction per 64 bytes of weights and row); the output, the layer norms, the residual
stream and the softmax stay float32. On a CPU without AVX-512 BF16 the same entry point is
a portable C loop with the same rounding (correct, slower; `has_bf16()` says which).

Where the C kernels do not build at all, `Bf16Linear` keeps the bfloat16 weight and runs
torch's bfloat16 product (the same weights, torch's own rounding of the sums).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import cpu as cpu_kernels
from .linear import PackedBase, replace_bias_free

log = logging.getLogger(__name__)


class Bf16Linear(nn.Module):
    """A bias-free linear layer with a bfloat16 weight, through torch (no C kernels)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_bf16", weight.detach().to(torch.bfloat16).contiguous())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight_bf16)  # (..., out) bfloat16
        return y.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_bf16.float()


class PackedBf16Linear(PackedBase):
    """A bias-free linear layer with its weight in bfloat16, in the packed layout of the C kernels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", cpu_kernels.pack_bf16(weight))
        self._bind()

    def _bind(self) -> None:
        packed = self._bound = self._buffers["packed"]
        call, w, n, d = cpu_kernels.library().ms_linear_bf16, packed.data_ptr(), self.out_features, self.in_features
        act = getattr(self, "_act", 0)

        def kernel(x: torch.Tensor, rows: int) -> torch.Tensor:
            y = torch.empty(rows, n)
            if call(w, x.data_ptr(), y.data_ptr(), n, d, rows, act) != 0:
                raise RuntimeError(f"bfloat16 kernel refused the call: shape ({n}, {d})")
            return y

        self._kernel = kernel

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight as float32 (exactly the bfloat16 values; a copy)."""
        return cpu_kernels.unpack_bf16(self.packed)


def to_bf16(module: nn.Module, packed: bool | None = None) -> nn.Module:
    """Replace every bias-free `Linear` below `module` by a bfloat16 layer, in place: the packed
    form where the kernels build (AVX-512 BF16, or their portable loop), else `Bf16Linear`."""
    if packed is None:
        packed = cpu_kernels.library() is not None
        if packed and not cpu_kernels.has_bf16():
            log.info("this CPU has no AVX-512 BF16: bfloat16 weights use the portable C loop")

    def make(layer: nn.Linear) -> nn.Module:
        fits = layer.out_features % 16 == 0 and layer.in_features % 2 == 0
        return PackedBf16Linear(layer.weight) if packed and fits else Bf16Linear(layer.weight)
    return replace_bias_free(module, make)
