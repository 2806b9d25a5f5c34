"""Threading model: as the decoder's forward (one thread at a time); `install` and
`uninstall` run while no forward does.

The CPU backend's attention: the decoder's attention layers with the C kernel
(kernels/cpu.py) for one-token float32 steps, applied by swapping the classes of a
decoder's layers in place (`install`), so parameters, caches and state-dict keys stay.

A one-token eager step that reads the filled part of the cache (`kv_len` given, no
mask) goes to the kernel: it writes the new keys and values into the cache and attends
over the filled positions in one call. A float32 prefill into an 8-bit cache stores and
dequantizes through the kernel too (one call for keys, one for values, per layer), then
attends as the reference does. Everything else (other prefills, the static step,
gradients, other dtypes) takes the reference path of model/musicgen.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...kernels import cpu as cpu_kernels
from ...model.musicgen import CrossAttention, SelfAttention


def fast_path(x: torch.Tensor) -> bool:
    """Whether a one-token step on `x` can use the C attention kernel."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and cpu_kernels.library() is not None)


class CpuSelfAttention(SelfAttention):
    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None, kv_len: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        if T == 1 and kv_len is not None and mask is None and fast_path(x):
            qkv = self.wqkv(x).reshape(B, 3 * D).contiguous()  # (B, 3D)
            cache = self.cache
            scales = (cache.k_scale, cache.v_scale) if cache.k.dtype == torch.int8 else None
            out = cpu_kernels.attend(qkv[:, :D], (qkv[:, D:2 * D], qkv[:, 2 * D:]), cache.k, cache.v,
                                     int(input_pos[0]), kv_len, scales)  # (B, D)
            return self.wo(out.view(B, 1, D))
        if T > 1 and input_pos is not None and fast_path(x) and _reads_int8(self.cache):
            # A prefill (the prompt's, a window re-prime's slice) into an 8-bit cache: one C call per
            # keys and values quantizes the new positions and dequantizes the filled part, bit for
            # bit as QuantizedKVCache.update does it in a dozen torch operations.
            q, k, v = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            cache = self.cache
            n = cache.max_len if kv_len is None else kv_len
            k = cpu_kernels.kv_store_i8(k, input_pos, cache.k, cache.k_scale, n)
            v = cpu_kernels.kv_store_i8(v, input_pos, cache.v, cache.v_scale, n)
            return self.wo(self.attend_cache(q, k, v, mask).transpose(1, 2).reshape(B, T, D))
        return super().forward(x, input_pos, kv_len, mask)


def _reads_int8(cache) -> bool:
    """An 8-bit cache whose filled part is read as float32 (QuantizedKVCache with float32 `dtype`)."""
    return cache is not None and cache.k.dtype == torch.int8 and getattr(cache, "dtype", None) == torch.float32


class CpuCrossAttention(CrossAttention):
    def forward(self, x: torch.Tensor, static: bool) -> torch.Tensor:
        B, T, D = x.shape
        if not static and T == 1 and fast_path(x):
            assert self.cache is not None and self.cache.length > 0, "call set_condition() before decoding"
            q = self.wq(x).reshape(B, D).contiguous()  # (B, D)
            cache, mix = self.cache, self.cache.mix
            single = mix.single
            if single is not None:
                out = cpu_kernels.attend(q, None, cache.keys[single], cache.values[single], -1,
                                         mix.lengths[single])  # (B, D)
            else:  # the weighted sum over the prompt slots (model/musicgen.py attend_text)
                out = sum(cpu_kernels.attend(q, None, cache.keys[p], cache.values[p], -1, mix.lengths[p]) * w
                          for p, w in mix.active)
            return self.wo(out.view(B, 1, D))
        return super().forward(x, static)


_SWAPS = {SelfAttention: CpuSelfAttention, CrossAttention: CpuCrossAttention}


def install(decoder: nn.Module) -> Callable[[], None]:
    """Swap every attention layer below `decoder` for its CPU form; returns what swaps them back."""
    saved = [(m, type(m)) for m in decoder.modules() if type(m) in _SWAPS]
    for module, cls in saved:
        module.__class__ = _SWAPS[cls]

    def undo() -> None:
        for module, cls in saved:
            module.__class__ = cls
    return undo
