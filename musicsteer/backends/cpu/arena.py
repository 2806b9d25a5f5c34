"""Threading model: `place_on_huge_pages` runs once, at build (backends/select.py), before the
decoder steps; nothing here runs per step.

The CPU step's weights in one huge-page arena, in the order a step reads them.

A one-token step streams every weight once (0.2 GB for `small` in int4): norms, the self-
attention's products, the cross-attention's, the MLP's, block by block, then the heads. The
packers ask for huge pages (kernels/cpu.py `huge_page_empty`), but only for tensors of 2 MiB
or more: a block's attention products (0.5-1.5 MB each in int4), the scales and the norms
were on 4 KiB pages, two thirds of `small`'s int4 bytes. Here every tensor the step reads is
copied into one fresh mapping advised for 2 MiB pages, laid out in step order, 64-byte
aligned, and the modules take the copies (the packed layers rebind their kernel). On the
2-core test machines a streaming read of 200 MB ran at 19-22 GB/s over 4 KiB pages against
24-26 over 2 MiB pages, in turns in one process (docs/cpu-kernels.md).

What the prompt builder reads (the cross-attention's key/value products, moved into shared
memory for a prompt worker process) stays where it is. `MUSICSTEER_CPU_HUGE_PAGES=0` leaves
everything in place (for comparisons; the results are the same bits either way).
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch
from torch import nn

from ...kernels import cpu as cpu_kernels
from .linear import PackedBase

ALIGN = 64  # bytes: a cache line


def enabled() -> bool:
    return os.environ.get("MUSICSTEER_CPU_HUGE_PAGES", "1") != "0" and platform.system() == "Linux"


def step_modules(decoder: nn.Module) -> list[nn.Module]:
    """The modules whose tensors a one-token step reads, in the order it reads them."""
    order: list[nn.Module] = []
    for block in decoder.blocks:
        order += [block.norm_self, block.self_attn.wqkv, block.self_attn.wo, block.norm_cross,
                  block.cross_attn.wq, block.cross_attn.wo, block.norm_mlp, block.fc1, block.fc2]
    return order + [decoder.norm, decoder.heads]


def _tensors(module: nn.Module):
    """(dict, name, tensor) for a module's own parameters and buffers on the CPU."""
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            if t is not None and t.device.type == "cpu" and t.numel():
                yield table, name, t


def place_on_huge_pages(decoder: nn.Module) -> int:
    """Copy every tensor of `step_modules(decoder)` into one huge-page arena, in place; returns the
    arena's bytes (0 when turned off). Parameters keep their identity (their data moves)."""
    if not enabled():
        return 0
    items = [(module, *entry) for module in step_modules(decoder) for entry in _tensors(module)]
    offsets, total = [], 0
    for *_, t in items:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if not total:
        return 0
    arena = cpu_kernels.huge_pages(total)
    for (module, table, name, t), offset in zip(items, offsets):
        nbytes = t.numel() * t.element_size()
        moved = arena[offset:offset + nbytes].view(t.dtype).view(t.shape)
        moved.copy_(t)
        if isinstance(t, nn.Parameter):
            t.data = moved
        else:
            table[name] = moved
    for module in step_modules(decoder):
        if isinstance(module, PackedBase):
            module._bind()
    _trim()
    return total


def _trim() -> None:
    """Hand the freed copies back to the system (glibc keeps freed heap memory otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
