"""4-bit weights for the CPU step: about a seventh of the float32 bytes.

`quantize_int4(module)` replaces the bias-free linear layers below `module` by
`PackedInt4Linear` (backends/select.py gives it the decoder's blocks and keeps the heads in
int8: in 4 bits they cost most of the fidelity, for 2% of `small`'s bytes): symmetric int4 weights (-7..7) with one bfloat16 scale per output channel
and group of 64 inputs, each group's scale chosen among a few clipping ratios for the least
squared error. The nibbles are stored as q + 8, two per byte, packed in blocks of 16 outputs
on huge pages (0.53125 bytes per weight with the scales; float32 scales made it 0.5625), and unpacked in registers into the
int8 kernel's unsigned bytes; the activations are quantized per row in groups of 64 inputs as
for int8 and the products run on AVX-512 VNNI (`vpdpbusd`).

Without VNNI (or without the kernels) `Int4Linear` keeps the same int4 weights and multiplies
by their dequantized float32 form through torch: the same weights, float32 activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import cpu as cpu_kernels
from .linear import ScaledPackedBase, replace_bias_free


class Int4Linear(nn.Module):
    """int4 group-wise weights through torch (no VNNI kernel): dequantized once, at build."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = cpu_kernels.quantize_i4(weight)
        self.register_buffer("weight_dq", (q.float() * scale.repeat_interleave(cpu_kernels.GROUP, dim=1)))
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_dq.to(x.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_dq


class PackedInt4Linear(ScaledPackedBase):
    kernel_name, what = "ms_linear_i4", "int4"
    quantize, dequantize = staticmethod(cpu_kernels.quantize_pack_i4), staticmethod(cpu_kernels.dequantize_i4)


def quantize_int4(module: nn.Module, packed: bool | None = None) -> nn.Module:
    """Replace every bias-free `Linear` below `module` by an int4 layer, in place: the packed VNNI
    form where the kernels build and the CPU has VNNI, else `Int4Linear`. Layers whose inputs are
    not a multiple of 64 (or outputs of 16) stay as they are."""
    if packed is None:
        packed = cpu_kernels.has_int8()

    def make(layer: nn.Linear) -> nn.Module | None:
        if layer.in_features % cpu_kernels.GROUP or layer.out_features % 16:
            return None
        return PackedInt4Linear(layer.weight) if packed else Int4Linear(layer.weight)
    return replace_bias_free(module, make)
