"""Threading model: as the decoder's forward (one thread at a time). The binding of a block
(`FusedBlock`) is rebuilt on that thread when a cache or buffer behind it was replaced; the
C call releases the GIL and runs its own OpenMP region. The steering strengths it reads are
rewritten in place between steps by that same thread (SteeringPlan.write).

The decoder's blocks as C calls for the one-token CPU step (kernels/cpu_block.c).

After `optimize_for_cpu`, `quantize_int8`, `quantize_int4` or `to_bf16` has packed the blocks' weight products,
`fuse_blocks(decoder)` sets `decoder.fused_stack`: a one-token step then runs its
blocks' layer norms, products, attentions and residual adds in C, one OpenMP region
for every run of blocks between two hook points (one call for an unsteered step)
instead of about twenty Python-dispatched operations per block (about 5 ms of a
`small` step on the 2-core test machines).

Hooks keep their points and their order (steering first, then observers; the decoder
keeps them so): a steering hook (`KernelHook`) first at a block's `out` is applied
inside the C call, reading the steerer's buffers, so a steered step is still one call;
the other `out` hooks run in Python on the block's output, after the run of blocks up to
it is called (an observer beside steering sees the steered output and splits the run
there, once). A block with hooks at `attn` or `cross` runs in three calls with its hooks
between them. A block that cannot be fused (another weight format, an unknown
activation) takes the module path inside the same step. Prefill, the static (graph)
step, gradients and other dtypes keep the module path.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ...kernels import cpu as cpu_kernels
from ...kernels.hook import KernelHook, RowTap
from ...model.kv_cache import MAX_SLOTS
from .attention import fast_path
from .bf16 import PackedBf16Linear
from .int4 import PackedInt4Linear
from .int8 import PackedInt8Linear
from .linear import PackedLinear

log = logging.getLogger(__name__)

KIND_F32, KIND_I8, KIND_BF16, KIND_I4 = 0, 1, 2, 3
MAX_ROWS = cpu_kernels.MAX_ROWS
_ptr = ctypes.c_void_p


class _Layer(ctypes.Structure):
    """Mirror of `ms_layer` in cpu_block.c."""

    _fields_ = [("kind", ctypes.c_int), ("d", ctypes.c_int), ("ffn", ctypes.c_int), ("heads", ctypes.c_int),
                ("hd", ctypes.c_int), ("act", ctypes.c_int), ("cache_bf16", ctypes.c_int), ("max_len", ctypes.c_int),
                ("text_max", ctypes.c_int), ("eps", ctypes.c_float),
                ("norm_w", _ptr * 3), ("norm_b", _ptr * 3), ("w", _ptr * 6), ("scale", _ptr * 6),
                ("kc", _ptr), ("vc", _ptr), ("tk", _ptr * MAX_SLOTS), ("tv", _ptr * MAX_SLOTS), ("text_slots", ctypes.c_int),
                ("steer_k", ctypes.c_int), ("steer_mode", ctypes.c_int),
                ("steer_alpha", _ptr), ("steer_dirs", _ptr), ("steer_targets", _ptr),
                ("ks", _ptr), ("vs", _ptr), ("cache_i8", ctypes.c_int), ("tap", _ptr)]
KINDS = {PackedLinear: KIND_F32, PackedInt8Linear: KIND_I8, PackedBf16Linear: KIND_BF16, PackedInt4Linear: KIND_I4}  # ms_layer.kind
MAX_STEER = 64  # concepts the C steering update takes (MS_MAX_STEER)


def steering_of(hooks) -> KernelHook | None:
    """The first of a block's `out` hooks when it is a steering hook the C path can apply itself
    (float32 CPU buffers, at most MAX_STEER concepts), else None. The hooks after it run in Python."""
    if not hooks or not isinstance(hooks[0], KernelHook):
        return None
    hook = hooks[0]
    if hook.positions is not None:  # per-position strengths: the hook applies them in Python
        return None
    alpha, directions, targets = hook.alpha, hook.directions, hook.targets
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in (alpha, directions, targets)):
        return None
    if directions.shape[0] > MAX_STEER:
        return None
    return hook


def _linears(block: nn.Module) -> list[nn.Module]:
    return [block.self_attn.wqkv, block.self_attn.wo, block.cross_attn.wq, block.cross_attn.wo, block.fc1, block.fc2]


def _norms(block: nn.Module) -> list[nn.LayerNorm]:
    return [block.norm_self, block.norm_cross, block.norm_mlp]


def fusable(block: nn.Module) -> str | None:
    """Why `block` cannot run as one call, or None when it can."""
    if cpu_kernels.library() is None:
        return cpu_kernels.unavailable()
    linears = _linears(block)
    kinds = {type(m) for m in linears}
    if kinds not in ({PackedLinear}, {PackedInt8Linear}, {PackedBf16Linear}, {PackedInt4Linear}):
        return "its products are not all packed in one format"
    if any(m.activation is not None for m in linears if m is not block.fc1):
        return "an activation is fused where the block does not apply one"
    if block.activation not in cpu_kernels.ACTIVATIONS:
        return f"no fused form of activation {block.activation!r}"
    for norm in _norms(block):
        if not (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
                and norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu"):
            return "its norms are not float32 CPU LayerNorms with weight and bias"
    attn = block.self_attn
    if attn.head_dim > 256 or attn.heads * attn.head_dim != block.fc1.in_features:
        return "its heads do not fit the kernel"
    return None


def _child(module: nn.Module, name: str):
    """A submodule or plain attribute without nn.Module's slow attribute lookup (per step, per block)."""
    modules = module._modules
    return modules[name] if name in modules else module.__dict__.get(name)


class FusedBlock:
    """One block's weights and caches bound for `ms_block`/`ms_blocks`; rebound whenever a buffer or
    cache behind them is replaced (caches swapped by a re-prime, weights moved or reloaded)."""

    def __init__(self, block: nn.Module) -> None:
        reason = fusable(block)
        if reason is not None:
            raise ValueError(f"block cannot be fused: {reason}")
        self.block = block
        self._attn, self._cross = block.self_attn, block.cross_attn
        self._linears, self._norms = _linears(block), _norms(block)
        self.kind = KINDS[type(block.fc1)]
        self.scaled = self.kind in (KIND_I8, KIND_I4)  # weights with a scale buffer
        self.hidden = block.fc1.in_features
        self.layer = _Layer()
        self.address = ctypes.addressof(self.layer)
        self._key: tuple | None = None
        self._held: tuple = ()  # what the binding points into
        self._steer_hook = None  # the steering hook applied in C (it holds the buffers)
        self._tap = None  # the row tap applied in C (it holds its buffer)
        self._call = cpu_kernels.library().ms_block

    def _signature(self) -> tuple:
        """What the binding depends on: the identities of the caches and weight buffers (held by the
        binding, so an id is never reused while compared) and the norms' data pointers."""
        sc, cc = _child(self._attn, "cache"), _child(self._cross, "cache")
        parts: list = [id(sc), id(cc), id(sc._buffers["k"]), id(sc._buffers["v"]), *map(id, cc.keys),
                       *map(id, cc.values), id(sc._buffers.get("k_scale")), id(sc._buffers.get("v_scale"))]
        for m in self._linears:
            buffers = m._buffers
            parts.append(id(buffers["packed"]))
            if self.scaled:
                parts.append(id(buffers["scale"]))
        for norm in self._norms:
            parts += (norm.weight.data_ptr(), norm.bias.data_ptr())
        return tuple(parts)

    def _bind(self, key: tuple) -> None:
        b, L = self.block, self.layer
        sc, cc = _child(self._attn, "cache"), _child(self._cross, "cache")
        L.kind, L.d, L.ffn = self.kind, self.hidden, b.fc1.out_features
        L.heads, L.hd = self._attn.heads, self._attn.head_dim
        L.act, L.eps = cpu_kernels.ACTIVATIONS[b.activation], b.norm_self.eps
        for i, norm in enumerate(self._norms):
            L.norm_w[i], L.norm_b[i] = norm.weight.data_ptr(), norm.bias.data_ptr()
        for i, m in enumerate(self._linears):
            L.w[i] = m._buffers["packed"].data_ptr()
            L.scale[i] = m._buffers["scale"].data_ptr() if self.scaled else None
        L.kc, L.vc, L.max_len = sc.k.data_ptr(), sc.v.data_ptr(), sc.max_len
        L.cache_bf16 = int(sc.k.dtype == torch.bfloat16)
        L.cache_i8 = int(sc.k.dtype == torch.int8)
        scales = (sc.k_scale, sc.v_scale) if L.cache_i8 else ()
        L.ks, L.vs = (s.data_ptr() for s in scales) if scales else (None, None)
        L.text_max, L.text_slots = cc.max_text, cc.mix.slots
        for p in range(MAX_SLOTS):
            present = p < cc.mix.slots and cc.keys[p] is not None
            L.tk[p] = cc.keys[p].data_ptr() if present else None
            L.tv[p] = cc.values[p].data_ptr() if present else None
        self._held = (sc, cc, sc.k, sc.v, *scales, *cc.keys, *cc.values, *(m._buffers.get(n) for m in self._linears
                                                                           for n in ("packed", "scale")))
        self._key = key

    def ready(self, rows: int) -> bool:
        """Whether a one-token input of `rows` rows can take the C path now (caches in place and
        matching it); rebinds what changed since the last call."""
        sc, cc = _child(self._attn, "cache"), _child(self._cross, "cache")
        if sc is None or cc is None:
            return False
        k, tk = sc._buffers["k"], cc.keys[0]
        if not (rows <= MAX_ROWS and k.shape[0] == rows and tk.shape[0] == rows and tk.dtype == torch.float32
                and k.dtype in (torch.float32, torch.bfloat16, torch.int8) and k.is_contiguous() and tk.is_contiguous()
                and cc.length > 0):
            return False
        key = self._signature()
        if key != self._key:
            self._bind(key)
        return True

    def steer(self, hook: KernelHook | None, rows: int) -> bool:
        """Apply the steering hook `hook` in C from now on, or none (None); False when its buffers
        do not fit `rows`."""
        L = self.layer
        if hook is None:
            L.steer_k, self._steer_hook = 0, None
            return True
        if hook.alpha.shape[0] != rows or hook.directions.shape[1] != self.hidden:
            return False
        if hook is not self._steer_hook:
            L.steer_k, L.steer_mode = hook.directions.shape[0], hook.kernel
            L.steer_alpha, L.steer_dirs = hook.alpha.data_ptr(), hook.directions.data_ptr()
            L.steer_targets = hook.targets.data_ptr()
            self._steer_hook = hook  # holds the buffers the pointers point into
        return True

    def tap(self, hook: RowTap | None) -> bool:
        """Copy the block's output row 0 into `hook.dest` in C from now on (after the steering), or
        none (None); False when its buffer is not a float32 CPU vector of the block's width."""
        L = self.layer
        if hook is None:
            L.tap, self._tap = None, None
            return True
        dest = hook.dest
        if not (dest.dtype == torch.float32 and dest.device.type == "cpu" and dest.is_contiguous()
                and dest.numel() == self.hidden):
            return False
        if hook is not self._tap:
            L.tap, self._tap = dest.data_ptr(), hook
        return True

    def text_mix(self) -> tuple[int, int]:
        """Pointers to the prompt slots' lengths (int32) and weights (float32) the C call reads."""
        mix = _child(self._cross, "cache").mix
        return mix.lengths_dev.data_ptr(), mix.weights.data_ptr()

    def _run(self, first: int, last: int, rows: int, pos: int, kv_len: int, x=None, a=None, x1=None, c=None,
             out_a=None, out_x1=None, out_c=None, out=None) -> None:
        p = [t.data_ptr() if t is not None else None for t in (x, a, x1, c, out_a, out_x1, out_c, out)]
        rc = self._call(self.address, first, last, rows, pos, kv_len, *self.text_mix(), *p)
        if rc != 0:
            raise RuntimeError(f"fused block refused parts {first}-{last} ({rc}) at position {pos}, length {kv_len}")

    def forward_parts(self, x: torch.Tensor, pos: int, kv_len: int, hooks: dict) -> torch.Tensor:
        """The block in three calls with its `attn` and `cross` hooks between them (not `out`)."""
        B, T, D = x.shape
        a = torch.empty(B, T, D)
        self._run(0, 0, B, pos, kv_len, x=x, out_a=a)
        for hook in hooks.get("attn", ()):
            a = hook(a)
        x1, c = torch.empty(B, T, D), torch.empty(B, T, D)
        self._run(1, 1, B, pos, kv_len, x=x, a=_rows(a), out_x1=x1, out_c=c)
        for hook in hooks.get("cross", ()):
            c = hook(c)
        out = torch.empty(B, T, D)
        self._run(2, 2, B, pos, kv_len, x1=x1, c=_rows(c), out=out)
        return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _out_hooks(x: torch.Tensor, hooks) -> torch.Tensor:
    """x through `hooks` in order (a block's `out` list, or what is left of it)."""
    for hook in hooks:
        x = hook(x)
    return _rows(x)


class FusedStack:
    """The decoder's blocks for one-token CPU steps: runs of blocks between hook points in one
    `ms_blocks` call each, hooks between calls, unfusable blocks through their modules."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.fused = [FusedBlock(b) if fusable(b) is None else None for b in self.blocks]
        self._addresses = (ctypes.c_void_p * len(self.blocks))(*[f.address if f else None for f in self.fused])
        self._base = ctypes.addressof(self._addresses)
        self._call = cpu_kernels.library().ms_blocks
        self._call_side = cpu_kernels.library().ms_blocks_side
        # (function, argument) addresses of a C job for thread 0 of the next call (ms_blocks_side), which
        # then clears it: the stream's codec decode (live/producer.py); None: none.
        self.side: tuple[int, int] | None = None

    def __len__(self) -> int:
        return sum(f is not None for f in self.fused)

    def __reduce__(self):  # bound to this process's memory: a copy or pickle of the decoder drops it
        return type(None), ()

    def _flush(self, start: int, end: int, x: torch.Tensor, pos: int, kv_len: int) -> torch.Tensor:
        out = torch.empty_like(x)
        args = (self._base + start * ctypes.sizeof(ctypes.c_void_p), end - start, x.shape[0], pos, kv_len,
                *self.fused[start].text_mix(), x.data_ptr(), out.data_ptr())
        side, self.side = self.side, None
        rc = self._call(*args) if side is None else self._call_side(*args, *side)
        if rc != 0:
            raise RuntimeError(f"fused blocks {start}-{end - 1} refused the step ({rc}) at position {pos}, "
                               f"length {kv_len}")
        return out

    def takes(self, x: torch.Tensor, kv_len: int | None, mask) -> bool:
        """Whether the decoder's blocks on `x` (B, T, D) run here: one-token float32 CPU steps that
        read the filled part of the cache (the eager step), without gradients."""
        return kv_len is not None and mask is None and x.shape[1] == 1 and fast_path(x)

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Hidden states (B, 1, D) through every block, as `Block.forward` would give them."""
        x = x.contiguous()
        pos, rows = int(input_pos[0]), x.shape[0]
        start = None  # first block of the run not yet called
        for i, (block, fused) in enumerate(zip(self.blocks, self.fused)):
            hooks = block.hooks
            inner = "attn" in hooks or "cross" in hooks
            out_hooks = hooks.get("out", ())
            if fused is not None and fused.ready(rows):
                if not inner:
                    if start is None:
                        start = i
                    steering = steering_of(out_hooks)
                    if steering is not None and fused.steer(steering, rows):
                        out_hooks = out_hooks[1:]  # steering applied inside the call
                    else:
                        fused.steer(None, rows)
                    if out_hooks and isinstance(out_hooks[0], RowTap) and fused.tap(out_hooks[0]):
                        out_hooks = out_hooks[1:]  # the row copied inside the call
                    else:
                        fused.tap(None)
                    if out_hooks:  # observers see this block's (steered) output: call the run up to here
                        x, start = _out_hooks(self._flush(start, i + 1, x, pos, kv_len), out_hooks), None
                    continue  # else the run goes on
                if start is not None:
                    x, start = self._flush(start, i, x, pos, kv_len), None
                fused.steer(None, rows)
                fused.tap(None)
                x = _out_hooks(fused.forward_parts(x, pos, kv_len, hooks), out_hooks)
                continue
            if start is not None:
                x, start = self._flush(start, i, x, pos, kv_len), None
            x = _rows(block(x, input_pos, kv_len, None, False))
        if start is not None:
            x = self._flush(start, len(self.blocks), x, pos, kv_len)
        return x


def fuse_blocks(decoder: nn.Module) -> int:
    """Set `decoder.fused_stack` where any block can be fused; returns how many blocks are."""
    stack = FusedStack(list(getattr(decoder, "blocks", ())))
    for i, fused in enumerate(stack.fused):
        if fused is None:
            log.debug("block %d keeps the module path: %s", i, fusable(stack.blocks[i]))
    decoder.fused_stack = stack if len(stack) else None
    return len(stack)


def unfuse_blocks(decoder: nn.Module) -> None:
    decoder.fused_stack = None
