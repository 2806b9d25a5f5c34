"""Reduced-precision weights: int8 per output channel, for the CPU step.

`quantize_int8(decoder)` replaces the decoder's linear layers (blocks and heads) by
`Int8Linear`: weights stored as int8 with one bfloat16 scale per output row
(symmetric, round to nearest), products by torch's `_weight_int8pack_mm` on bfloat16
activations. A step then reads a quarter of the float32 bytes. It is an option, not
the default: tokens differ from the float32 model's, so parity tests stay float32.

Where the project's C kernels build on a CPU with AVX-512 VNNI, `PackedInt8Linear` is used
instead: the same int8 weights (stored q + 128, packed in blocks of 16 outputs on huge pages),
activations quantized per row in groups of 64 inputs, products by vpdpbusd. On the 2-core
test machines it streams a `small` step's weights at about 36 GB/s against 10-20 GB/s for
`_weight_int8pack_mm`. Prefill runs the same kernel `PACKED_ROWS` rows at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels import cpu as cpu_kernels
from .linear import ScaledPackedBase, replace_bias_free


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


class PackedInt8Linear(ScaledPackedBase):
    kernel_name, what = "ms_linear_i8", "int8"
    quantize, dequantize = staticmethod(cpu_kernels.quantize_pack_i8), staticmethod(cpu_kernels.dequantize_i8)


def packed_int8_kernels() -> bool:
    return cpu_kernels.has_int8()


def quantize_int8(module: nn.Module, packed: bool | None = None) -> nn.Module:
    """Replace every bias-free `Linear` below `module` by an int8 layer, in place: the packed
    VNNI form where the kernels build and the CPU has it, else `Int8Linear`."""
    if packed is None:
        packed = packed_int8_kernels()

    def make(layer: nn.Linear) -> nn.Module:
        fits = layer.out_features % 16 == 0 and layer.in_features % 64 == 0
        return PackedInt8Linear(layer.weight) if packed and fits else Int8Linear(layer.weight)
    return replace_bias_free(module, make)
