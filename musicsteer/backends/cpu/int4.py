"""4-bit weights for the CPU step: about a seventh of the float32 bytes.

`quantize_int4(module)` replaces the bias-free linear layers below `module` by
`PackedInt4Linear` (backends/select.py gives it the decoder's blocks and keeps the heads in
int8: in 4 bits they cost most of the fidelity, for 2% of `small`'s bytes): symmetric int4 weights (-7..7) with one float32 scale per output channel
and group of 64 inputs, each group's scale chosen among a few clipping ratios for the least
squared error. The nibbles are stored as q + 8, two per byte, packed in blocks of 16 outputs
on huge pages (0.5625 bytes per weight with the scales), and unpacked in registers into the
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
from .linear import PackedBase


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


class PackedInt4Linear(PackedBase):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed, scale = cpu_kernels.quantize_pack_i4(weight)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self._bind()

    def _bind(self) -> None:
        packed, scale = self._bound, self._scale = self._buffers["packed"], self._buffers["scale"]
        call, w, sc = cpu_kernels.library().ms_linear_i4, packed.data_ptr(), scale.data_ptr()
        n, d, act = self.out_features, self.in_features, getattr(self, "_act", 0)

        def kernel(x: torch.Tensor, rows: int) -> torch.Tensor:
            y = torch.empty(rows, n)
            if call(w, sc, x.data_ptr(), y.data_ptr(), n, d, rows, act) != 0:
                raise RuntimeError(f"int4 kernel refused the call: shape ({n}, {d})")
            return y

        self._kernel = kernel

    def _fast(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        if self._scale is not self._buffers["scale"]:
            self._bind()
        return super()._fast(x, rows)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, dequantized (a copy)."""
        return cpu_kernels.dequantize_i4(self.packed, self.scale)


def quantize_int4(module: nn.Module, packed: bool | None = None) -> nn.Module:
    """Replace every bias-free `Linear` below `module` by an int4 layer, in place: the packed VNNI
    form where the kernels build and the CPU has VNNI, else `Int4Linear`. Layers whose inputs are
    not a multiple of 64 (or outputs of 16) stay as they are."""
    if packed is None:
        packed = cpu_kernels.has_int8()
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            if child.in_features % cpu_kernels.GROUP == 0 and child.out_features % 16 == 0:
                setattr(module, name, PackedInt4Linear(child.weight) if packed else Int4Linear(child.weight))
        else:
            quantize_int4(child, packed)
    return module
