"""Threading model: `prepare` runs once, at load, before any forward.

The one place a backend is chosen: once, at load, from the device, the dtype, the
weight format and the KV cache's storage (`--compute`, `--dtype`, `--weights`, `--kv-cache`).

- CPU, float32, full weights: `cpu-f32`. Every linear layer packed for the C kernels
  (or the few-row torch forms where they do not build), the MLP activation fused into
  the first product, the attention layers with the C kernel, and the blocks of a
  one-token step as C calls (`fused_stack`).
- CPU, int8 weights: `cpu-int8`. The same, with int8 products (AVX-512 VNNI where the
  CPU has it) and bfloat16 self-attention caches.
- CPU, bfloat16 weights (`--weights bf16`, or `--dtype bfloat16` where the C kernels
  build): `cpu-bf16`. The same, with bfloat16 products (AVX-512 BF16 where the CPU has
  it, a portable C loop otherwise) on float32 activations, and bfloat16 self-attention
  caches. The decoder's activations, norms and logits stay float32.
- CPU, int4 weights: `cpu-int4`. As int8, with the blocks' weights in 4 bits per group
  of 64 inputs, unpacked in registers for the same VNNI products (a torch form of the
  same weights where the CPU lacks VNNI); the heads stay int8.
- CPU, any of these with `--kv-cache int8`: the self-attention caches in 8 bits with one
  float32 scale per row, head and position (model/kv_cache.QuantizedKVCache), read by the
  C attention kernel directly (a quarter of float32's bytes, half of bfloat16's).
- CPU, another dtype: `cpu`. The few-row linear forms and the C attention where they apply.
- CUDA: `cuda`. The static (graph) step's attention through the Triton kernel where
  Triton is installed; the live stream captures CUDA graphs by default.
- Anything else: `torch`, the model's reference path.

`prepare` applies the choice to a decoder in place and says what it chose. The model
knows nothing of this: the backends swap its layers' classes or set its
`fused_stack`, and the reference path stays underneath for every call they do not take.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import UsageError
from ..kernels.dispatch import triton_available

WEIGHTS = ("full", "int8", "bf16", "int4")
# Self-attention cache storage: auto (bfloat16 beside reduced CPU weights, the model's dtype
# otherwise), the model's float32, bfloat16, or int8 with per-head, per-position scales (CPU).
KV_CACHES = ("auto", "float32", "bf16", "int8")


@dataclass(frozen=True)
class Backend:
    name: str  # cpu-f32 | cpu-int8 | cpu-bf16 | cpu-int4 | cpu | cuda | torch
    device: str  # the device type
    graphs: bool  # whether the live stream captures CUDA graphs unless told otherwise
    fused_blocks: int = 0  # blocks a one-token step runs as C calls
    detail: str = ""


class BackendError(ValueError):
    """A combination of device, dtype and weights no backend offers."""


def resolve_device(name: str, what: str = "--compute") -> torch.device:
    """The torch device `name` names (cpu, cuda, cuda:N, or auto: the GPU when there is one);
    `what` names the option in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{what} {name!r} is not a device name (cpu, cuda, cuda:N, auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what} cuda asked for, but this machine has no CUDA GPU")
    return device


def captures_graphs(device: torch.device | str) -> bool:
    """Whether a stream on `device` steps through captured CUDA graphs by default."""
    return torch.device(device).type == "cuda"


def prepare(decoder: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32,
            weights: str = "full", kv_cache: str = "auto") -> Backend:
    """Move `decoder` to `device`/`dtype` and apply the backend for them, in place."""
    kind = torch.device(device).type
    if weights not in WEIGHTS:
        raise BackendError(f"unknown weight format {weights!r}; use {' or '.join(WEIGHTS)}")
    if kv_cache not in KV_CACHES:
        raise BackendError(f"unknown KV cache format {kv_cache!r}; use {' or '.join(KV_CACHES)}")
    if kv_cache in ("int8", "bf16") and kind != "cpu":
        raise BackendError(f"a {kv_cache} KV cache is a CPU option; on a GPU the cache follows --dtype")
    backend = _prepare(decoder, device, kind, dtype, weights)
    if kv_cache != "auto":  # the storage the user asked for, over the backend's default
        decoder.cache_dtype = {"float32": None, "bf16": torch.bfloat16, "int8": torch.int8}[kv_cache]
    if decoder.cache_dtype == torch.int8:
        backend = replace(backend, detail=f"{backend.detail}, int8 KV cache")
    return backend


def _prepare(decoder: nn.Module, device: torch.device | str, kind: str, dtype: torch.dtype, weights: str) -> Backend:
    if weights in ("int8", "int4") and kind != "cpu":
        raise BackendError(f"{weights} weights are a CPU option; on a GPU use --dtype float16 or bfloat16")
    if weights == "bf16" and kind != "cpu":
        raise BackendError("bf16 weights are a CPU option; on a GPU use --dtype bfloat16")
    if weights == "bf16" and dtype not in (torch.float32, torch.bfloat16):
        raise BackendError(f"bf16 weights keep float32 activations; --dtype {str(dtype).replace('torch.', '')} "
                           "does not combine with them")
    if kind == "cpu":
        if weights == "bf16" or (dtype == torch.bfloat16 and weights == "full" and _kernels_build()):
            weights, dtype = "bf16", torch.float32  # bfloat16 weights, float32 activations (the packed path)
        decoder.to(device=device, dtype=dtype)
        return _prepare_cpu(decoder, dtype, weights)
    decoder.to(device=device, dtype=dtype)
    if kind == "cuda":
        from .cuda import attention

        triton = triton_available()
        if triton:
            attention.install(decoder)
        return Backend("cuda", kind, graphs=True, detail="Triton decode attention" if triton else "torch attention")
    return Backend("torch", kind, graphs=False, detail="the reference path")


def _kernels_build() -> bool:
    from ..kernels import cpu as cpu_kernels

    return cpu_kernels.library() is not None


def _prepare_cpu(decoder: nn.Module, dtype: torch.dtype, weights: str) -> Backend:
    from ..kernels import cpu as cpu_kernels
    from .cpu import attention
    from .cpu.arena import place_on_huge_pages
    from .cpu.bf16 import to_bf16
    from .cpu.fused import fuse_blocks
    from .cpu.int4 import quantize_int4
    from .cpu.int8 import quantize_int8
    from .cpu.linear import fuse_activations, optimize_for_cpu, use_few_row_linear

    if weights == "int8":
        quantize_int8(decoder)
        decoder.cache_dtype = torch.bfloat16  # reduced precision end to end: half the cache bytes
        name = "cpu-int8"
    elif weights == "int4":
        quantize_int4(decoder.blocks)
        quantize_int8(decoder)  # the heads (2% of `small`'s bytes) in int8: in int4 they cost most of the fidelity
        decoder.cache_dtype = torch.bfloat16
        name = "cpu-int4"
    elif weights == "bf16":
        to_bf16(decoder)
        decoder.cache_dtype = torch.bfloat16  # as int8: half the cache bytes
        name = "cpu-bf16"
    elif dtype == torch.float32:
        optimize_for_cpu(decoder)
        name = "cpu-f32"
    else:
        name = "cpu"
    for part in (decoder.blocks, decoder.heads):  # what was not packed keeps the few-row path
        use_few_row_linear(part)
    attention.install(decoder)
    place_on_huge_pages(decoder)  # the step's weights in step order on 2 MiB pages, before fusion binds them
    fused = 0
    if name != "cpu":
        fuse_activations(decoder)
        fused = fuse_blocks(decoder)
    detail = "C kernels" if cpu_kernels.library() is not None else f"torch only ({cpu_kernels.unavailable()})"
    return Backend(name, "cpu", graphs=False, fused_blocks=fused, detail=detail)
