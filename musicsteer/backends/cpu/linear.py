"""The decoder's linear layer: `nn.Linear` with CPU fast paths for the one-token step.

For a handful of rows (the CFG batch of two, one position) in float32 on CPU, MKL's
`x @ W.T` falls off its fast path, while the same product written as `(W @ x.T).T`
streams the weight once at close to the memory bandwidth (measured on the 2-core
test machines: 24-32 GB/s against 8-24 GB/s for `F.linear`, 1.5x faster for a whole
`small` step). Prefill and other dtypes use `F.linear`. The weight layout is the
standard one, so loading and the state dict are unchanged.

`optimize_for_cpu` goes further where the project's C kernels build (kernels/cpu.py):
`PackedLinear` stores the weight in blocks of 16 output channels on huge pages and
streams it once per step with AVX-512 (about 40 GB/s against 27 for `(W @ x.T).T` on a
`small` step's weights, same machine and run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import cpu as cpu_kernels

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


# Rows per kernel call (passes of 8 rows). More rows (prefill) go through the kernel in slices
# of this many: as fast as unpacking the weight for MKL at 400 rows in float32, and 4-10x faster
# in int8, where MKL needs the weight dequantized first (one 4096 x 1024 layer, 2-core machine).
PACKED_ROWS = 32
# Rows per call of the int8 and int4 kernels where they run on AMX tiles (kernels/cpu_amx.c): the
# activations' int8 form of this many rows (2 MB at 4096 inputs) stays in the caches.
TILE_ROWS = 512


class PackedBase(nn.Module):
    """What the packed layers share: the one-token path calls the C kernel with the buffers'
    addresses bound once (a step makes ~150 of these calls, so the per-call Python matters),
    re-bound whenever a buffer is replaced. Float32 rows go through the kernel (in slices for
    prefill); other dtypes and autograd go to torch on the unpacked weight."""

    out_features: int
    in_features: int
    activation: str | None = None  # applied to the outputs (set by fuse_activations)

    def _bind(self) -> None:
        raise NotImplementedError

    # The bound kernel is a closure over this process's addresses. `share_memory()` moves a buffer's
    # bytes without replacing the tensor (which `_fast` would notice), so every `_apply` rebinds; a
    # pickle (to a prompt worker process, live/prompt_process.py) leaves the binding out and the
    # copy binds its own.

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._bind()
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_kernel", "_bound", "_scale")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._bind()

    def fuse_activation(self, name: str) -> None:
        """Apply `name` (gelu, gelu_tanh or relu) to the outputs: in the kernel's epilogue for a few rows,
        after MKL's product otherwise."""
        if name not in cpu_kernels.ACTIVATIONS:
            raise ValueError(f"no fused form of activation {name!r}")
        self.activation, self._act = name, cpu_kernels.ACTIVATIONS[name]
        self._bind()

    def _fast(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        if self._bound is not self._buffers["packed"]:  # moved, loaded or replaced since bound
            self._bind()
        return self._kernel(x, rows)

    def _prefill_rows(self) -> int:
        """Rows per kernel call for a prefill."""
        return PACKED_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        rows = flat.shape[0]
        if x.dtype is torch.float32 and not torch.is_grad_enabled():
            flat = flat.contiguous()
            step = self._prefill_rows()
            if rows <= step:
                y = self._fast(flat, rows)
            else:  # prefill: the kernel on slices of rows, with no copy of the weight to unpack
                y = torch.cat([self._fast(flat[i : i + step], min(step, rows - i)) for i in range(0, rows, step)])
        else:
            y = F.linear(flat, self.weight.to(x.dtype))
            if self.activation == "relu":
                y = F.relu(y)
            elif self.activation is not None:
                y = F.gelu(y, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return y.view(*shape[:-1], self.out_features)


class ScaledPackedBase(PackedBase):
    """A packed layer of quantized weights with per-output (or per-group) scales: the quantized
    formats set `quantize(weight) -> (packed, scale)`, `dequantize(packed, scale)`, the kernel's
    name in the library (`kernel_name`, called as (w, scale, x, y, n, d, rows, act)) and a name
    for errors (`what`)."""

    kernel_name: str
    what: str

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed, scale = self.quantize(weight)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self._bind()

    def _bind(self) -> None:
        packed, scale = self._bound, self._scale = self._buffers["packed"], self._buffers["scale"]
        call, w, sc = getattr(cpu_kernels.library(), self.kernel_name), packed.data_ptr(), scale.data_ptr()
        n, d, act, what = self.out_features, self.in_features, getattr(self, "_act", 0), self.what

        def kernel(x: torch.Tensor, rows: int) -> torch.Tensor:
            y = torch.empty(rows, n)
            if call(w, sc, x.data_ptr(), y.data_ptr(), n, d, rows, act) != 0:
                raise RuntimeError(f"{what} kernel refused the call: shape ({n}, {d})")
            return y

        self._kernel = kernel

    def _fast(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        if self._scale is not self._buffers["scale"]:
            self._bind()
        return super()._fast(x, rows)

    def _prefill_rows(self) -> int:
        # on AMX tiles a call reads the weights once for all of its rows: a whole prefill at once
        return TILE_ROWS if cpu_kernels.use_tiles() else PACKED_ROWS

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, dequantized (a copy)."""
        return self.dequantize(self.packed, self.scale)


def replace_bias_free(module: nn.Module, make) -> nn.Module:
    """Replace every bias-free `nn.Linear` below `module` by `make(layer)`, in place; where `make`
    returns None the layer stays as it is."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            new = make(child)
            if new is not None:
                setattr(module, name, new)
        else:
            replace_bias_free(child, make)
    return module


class PackedLinear(PackedBase):
    """A bias-free float32 linear layer in the packed layout of the C kernels (CPU only).

    Every float32 call streams the packed weight, `PACKED_ROWS` rows at a time."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", cpu_kernels.pack_f32(weight))
        self._bind()

    def _bind(self) -> None:
        packed = self._bound = self._buffers["packed"]
        call, w, n, d = cpu_kernels.library().ms_linear_f32, packed.data_ptr(), self.out_features, self.in_features
        act = getattr(self, "_act", 0)

        def kernel(x: torch.Tensor, rows: int) -> torch.Tensor:
            y = torch.empty(rows, n)
            call(w, x.data_ptr(), y.data_ptr(), n, d, rows, act)
            return y

        self._kernel = kernel

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, unpacked (a copy)."""
        return cpu_kernels.unpack_f32(self.packed)


def fuse_activations(decoder: nn.Module) -> int:
    """Move each block's MLP activation into its packed first projection (one pass less over the
    hidden vector per block, and one operation less to dispatch); returns how many were fused."""
    fused = 0
    for block in getattr(decoder, "blocks", ()):
        if isinstance(block.fc1, PackedBase) and block.activation in cpu_kernels.ACTIVATIONS:
            block.fc1.fuse_activation(block.activation)
            block.fused_act = True
            fused += 1
    return fused


def packed_kernels() -> bool:
    return cpu_kernels.library() is not None


def use_few_row_linear(module: nn.Module) -> int:
    """Give every plain `nn.Linear` below `module` the few-row fast path of `Linear`, in place (a
    class swap: the weight, bias and state-dict keys stay); returns how many."""
    plain = [m for m in module.modules() if type(m) is nn.Linear]  # modules() includes `module`
    for m in plain:
        m.__class__ = Linear
    return len(plain)


def optimize_for_cpu(module: nn.Module, packed: bool | None = None) -> nn.Module:
    """Swap float32 layers for the fastest CPU form, in place (CPU one-token steps): all of them
    for `PackedLinear` where the C kernels build, else the wide ones for `ChunkedLinear`."""
    if packed is None:
        packed = packed_kernels()
    for name, child in list(module.named_children()):
        if not (isinstance(child, nn.Linear) and child.bias is None and child.weight.dtype == torch.float32):
            optimize_for_cpu(child, packed)
        elif packed and child.out_features % 16 == 0:
            setattr(module, name, PackedLinear(child.weight))
        elif child.in_features % child.out_features == 0 and child.in_features >= 2 * child.out_features:
            setattr(module, name, ChunkedLinear(child.weight))
    return module
