"""Threading model: the forward runs on one thread at a time (the producer's, or the
caller's offline). Hooks may be added and removed from any thread (a live session's
main thread attaches meters while the producer thread attaches steering): every write
replaces a hook point's list with a new one under one lock, and `Block.forward` reads
the lists without a lock, so a forward running meanwhile sees each point's old or new
list whole, never a half-changed one.

The lean MusicGen decoder: codebook embeddings, sinusoidal positions, pre-norm
blocks (self-attention, cross-attention to the projected text states, MLP), a final
norm and one output head per codebook, over a static KV cache.

One forward serves three uses:
- the one-token `step` (T = 1) of generation, shapes fixed;
- `prefill` of a prompt of codes (T > 1), causal within the prompt;
- a full uncached forward (`use_cache=False`), for extraction and checks.

Named hook points (`blocks.{i}.attn`, `blocks.{i}.cross`, `blocks.{i}.out`) let
steering add to the self-attention output, the cross-attention output and the
residual stream after each block. The decoder knows nothing of MIDI, OSC, text
tokenizers or audio: it sees codes and projected text states, and gives logits.

It also knows nothing of backends. Every layer here has one path, the reference
(torch's products and `scaled_dot_product_attention`); faster ones are applied from
outside, once, at load (backends/select.py): the CPU backend swaps the attention
classes and linear layers for subclasses with C fast paths and sets `fused_stack`,
which runs the blocks of a one-token step as C calls; the CUDA backend swaps in the
Triton attention of the static step. A swapped layer keeps its parameters, buffers and
state-dict keys, and falls back to the reference path for any call it does not take.
"""

from __future__ import annotations

import math
import threading
from bisect import insort_right
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import CrossCache, KVCache, PromptMix, QuantizedKVCache

Hook = Callable[[torch.Tensor], torch.Tensor]
HOOK_KINDS = ("attn", "cross", "out")


def sinusoid_table(length: int, dim: int, style: str = "transformers") -> torch.Tensor:
    """Sinusoidal positions, cos in the first half and sin in the second, (length, dim).

    The two checkpoint families compute the same angles with different float32
    rounding; `style` picks the one the weights were trained with.
    """
    half = dim // 2
    pos = torch.arange(length, dtype=torch.float32)
    if style == "transformers":
        freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        angle = pos[:, None] * freq[None, :]
    elif style == "audiocraft":
        period = torch.full([], 10000.0) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
        angle = pos[:, None] / period[None, :]
    else:
        raise ValueError(f"unknown position style {style!r}")
    table = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table  # (L, D)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


_HOOK_WRITES = threading.Lock()  # every decoder's hook writes (a module-level lock: decoders deep-copy)
CAUSAL = torch.ones(())  # stands for the causal mask of a prompt that fills the cache from position 0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None, kv_len: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if input_pos is None:  # uncached: attend within this call, causally
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            assert self.cache is not None, "call setup_caches() before a cached forward"
            k, v = self.cache.update(input_pos, k, v, kv_len)  # (B, H, L, hd); eager: the filled kv_len
            out = self.attend_cache(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))

    @staticmethod
    def attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The queries (B, H, T, hd) over the cache's keys and values as `update` returned them."""
        if k.dtype != q.dtype:  # a narrower cache (cache_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is CAUSAL:  # flash / memory-efficient kernels where the device has them
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def text_memory(wkv: nn.Module, heads: int, head_dim: int, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values of the projected text states (B, S, D) through its projection
    `wkv`, each (B, H, S, hd): the one code every builder of a prompt's memory runs."""
    B, S, _ = text.shape
    k, v = wkv(text).view(B, S, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    return k, v


def project_text(text_proj: nn.Module, dtype: torch.dtype, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The text encoder's states (B, S, text_hidden) in the decoder's width, masked positions zeroed."""
    return text_proj(text.to(dtype)) * mask[..., None].to(dtype)


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.wkv = nn.Linear(cfg.hidden, 2 * cfg.hidden, bias=False)
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.cache: CrossCache | None = None

    def memory(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the projected text states (B, S, D), each (B, H, S, hd)."""
        return text_memory(self.wkv, self.heads, self.head_dim, text)

    def forward(self, x: torch.Tensor, static: bool) -> torch.Tensor:
        assert self.cache is not None and self.cache.length > 0, "call set_condition() before decoding"
        B, T, D = x.shape
        q = self.wq(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        out = self.attend_text(q, static)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))

    def attend_text(self, q: torch.Tensor, static: bool) -> torch.Tensor:
        """Attention of `q` (B, H, T, hd) over the prompt slots, blended by the mix's weights: the
        weighted sum of the attention over each slot's memory (a slot read alone, weight 1, is
        exactly the single prompt's attention)."""
        cache = self.cache
        mix = cache.mix
        if static:  # fixed shapes: every slot, padding masked out, weights read from the device
            out = None
            for p in range(mix.slots):
                if cache.keys[p] is None:  # never filled (pinned caches allocate every slot)
                    continue
                o = F.scaled_dot_product_attention(q, cache.keys[p], cache.values[p], attn_mask=mix.mask[p])
                o = o * mix.weights[p]
                out = o if out is None else out + o
            return out
        single = mix.single
        if single is not None:
            n = mix.lengths[single]
            return F.scaled_dot_product_attention(q, cache.keys[single][:, :, :n], cache.values[single][:, :, :n])
        out = None
        for p, w in mix.active:
            n = mix.lengths[p]
            o = F.scaled_dot_product_attention(q, cache.keys[p][:, :, :n], cache.values[p][:, :, :n]) * w
            out = o if out is None else out + o
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.norm_cross = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)
        self.activation = cfg.activation
        self.act = _activation(cfg.activation)  # the identity where fc1 applies it itself
        # kind -> hooks applied in order; read by forward, written only through MusicGen's hook methods
        self.hooks: dict[str, list[Hook]] = {}

    @property
    def fused_act(self) -> bool:
        """Whether fc1 applies the activation itself (a backend fused it into the product)."""
        return self.act is _identity

    @fused_act.setter
    def fused_act(self, fused: bool) -> None:
        self.act = _identity if fused else _activation(self.activation)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None, kv_len: int | None,
                mask: torch.Tensor | None, static: bool) -> torch.Tensor:
        hooks = self.hooks
        a = self.self_attn(self.norm_self(x), input_pos, kv_len, mask)
        for hook in hooks.get("attn", ()):
            a = hook(a)
        x = x + a
        c = self.cross_attn(self.norm_cross(x), static)
        for hook in hooks.get("cross", ()):
            c = hook(c)
        x = x + c
        h = self.fc1(self.norm_mlp(x))
        x = x + self.fc2(self.act(h))
        for hook in hooks.get("out", ()):
            x = hook(x)
        return x


class MusicGen(nn.Module):
    """The decoder. Call `setup_caches`, then `set_condition` per prompt, then `prefill`/`step`."""

    def __init__(self, cfg: ModelConfig, position_style: str = "transformers") -> None:
        super().__init__()
        self.cfg = cfg
        K, V, D = cfg.codebooks, cfg.vocab, cfg.hidden
        # All codebook tables in one: codebook k's token t is row k * (V + 1) + t.
        self.embed = nn.Embedding(K * (V + 1), D)
        self.position_style = position_style
        self._make_buffers(None)
        self.text_proj: nn.Module = nn.Linear(cfg.text_hidden, D) if cfg.text_hidden != D else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.heads = nn.Linear(D, K * V, bias=False)  # codebook k's head is rows [k*V, (k+1)*V)
        self.batch = 0
        self.prompt_mix: PromptMix | None = None  # the prompt slots' weights, from setup_caches
        # Storage dtype of the self-attention caches (None: the model's; torch.int8: 8-bit with
        # scales, QuantizedKVCache). Reduced-precision CPU weights pair with bfloat16 caches: at a
        # 30 s window the cache is ~0.6 GB of float32 reads per `small` step, more than its int8 weights.
        self.cache_dtype: torch.dtype | None = None
        # A backend's runner for the blocks of one-token cached steps (backends/cpu/fused.py), or
        # None: `takes(x, kv_len, mask)` says whether it runs a call, which then skips the loop.
        self.fused_stack = None

    # -- set-up --------------------------------------------------------------

    def _make_buffers(self, device) -> None:
        K, V = self.cfg.codebooks, self.cfg.vocab
        self.register_buffer("codebook_offset", torch.arange(K, device=device)[:, None] * (V + 1), persistent=False)  # (K, 1)
        table = sinusoid_table(self.cfg.max_positions, self.cfg.hidden, self.position_style)
        self.register_buffer("positions", table.to(device), persistent=False)  # (L, D)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: Mapping[str, torch.Tensor],
                        position_style: str = "transformers") -> "MusicGen":
        """Build around existing tensors without allocating random weights first."""
        with torch.device("meta"):
            model = cls(cfg, position_style)
        model.load_state_dict(dict(state), strict=True, assign=True)
        first = next(iter(state.values()))
        model._make_buffers(first.device)
        return model.eval()

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> "MusicGen":
        """Random weights with the real shapes (for presets)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        model._make_buffers("cpu")
        model.init_weights(seed)
        return model.to(device=device, dtype=dtype).eval()

    def setup_caches(self, batch: int, max_len: int | None = None, max_text: int = 256,
                     self_attention: bool = True, prompts: int = 1) -> None:
        """Allocate the static caches once, at their maximum shape (batch 2 for CFG). Without
        `self_attention` only the cross-attention caches exist (for uncached forwards). `prompts`
        slots of cross-attention memory are held at once (blended by `set_prompt_weights`)."""
        cfg = self.cfg
        max_len = max_len or cfg.max_positions
        if max_len > cfg.max_positions:
            raise ValueError(f"cache of {max_len} positions exceeds the model's {cfg.max_positions}")
        p = self.embed.weight
        if self_attention:
            self.use_caches(self.make_caches(batch, max_len))
        else:
            for block in self.blocks:
                block.self_attn.cache = None
        self.prompt_mix = PromptMix(prompts, max_text, p.device)
        for block in self.blocks:
            block.cross_attn.cache = CrossCache(batch, cfg.heads, max_text, cfg.head_dim, p.dtype, p.device,
                                                self.prompt_mix)
        self.batch = batch

    def make_caches(self, batch: int, max_len: int) -> list[KVCache]:
        """A second set of self-attention caches (the stream re-primes into one while decoding on another)."""
        cfg, p = self.cfg, self.embed.weight
        if self.cache_dtype == torch.int8:  # 8-bit keys and values with per-head, per-position scales
            return [QuantizedKVCache(batch, cfg.heads, max_len, cfg.head_dim, p.dtype, p.device) for _ in self.blocks]
        dtype = self.cache_dtype or p.dtype
        return [KVCache(batch, cfg.heads, max_len, cfg.head_dim, dtype, p.device) for _ in self.blocks]

    def use_caches(self, caches: list[KVCache]) -> None:
        for block, cache in zip(self.blocks, caches, strict=True):
            block.self_attn.cache = cache

    @property
    def caches(self) -> list[KVCache]:
        return [block.self_attn.cache for block in self.blocks]

    @torch.no_grad()
    def set_condition(self, text: torch.Tensor, mask: torch.Tensor, slot: int = 0) -> None:
        """Project the text encoder's states (B, S, text_hidden) and cache cross-attention K/V in
        prompt slot `slot` (in place; the mix's weights stay as they are).

        `mask` (B, S) is 1 for real text positions; masked positions are zeroed, so a
        row of zeros with mask 0 is the unconditional (null-text) branch of CFG.
        """
        states = self._projected(text, mask)
        self.prompt_mix.set_length(slot, text.shape[1])
        for block in self.blocks:
            block.cross_attn.cache.fill(*block.cross_attn.memory(states), slot=slot)

    def _projected(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert text.shape[0] == self.batch, f"condition has {text.shape[0]} rows, caches hold {self.batch}"
        if text.shape[1] > self.prompt_mix.max_text:
            raise ValueError(f"prompt has {text.shape[1]} text tokens; the cache holds {self.prompt_mix.max_text}")
        return project_text(self.text_proj, self.embed.weight.dtype, text, mask)

    # A prompt built off the decoding thread (live/prompt_worker.py, live/prompt_process.py):
    # `memory_builder` holds what building one reads (weights only) and writes only the buffers it
    # is given, so it may run beside a forward on another thread or in another process (which it
    # is sent to, its weights shared); `install_memory` swaps the result in, on the decoding
    # thread, between two forwards.

    def memory_builder(self) -> "PromptMemory":
        """What builds prompt memories for these caches (set up by `setup_caches`), sharing this
        decoder's modules."""
        return PromptMemory(self)

    @torch.no_grad()
    def build_memory(self, text: torch.Tensor, mask: torch.Tensor, buffers: list | None = None) -> list:
        """Every layer's cross-attention K/V of a condition (B, S, text_hidden) in slot-shaped buffer
        pairs (`buffers`, one per layer, reused; None or a None pair: new ones). Returns the pairs."""
        return self.memory_builder().build_memory(text, mask, buffers)

    def install_memory(self, slot: int, buffers: list, length: int) -> list:
        """Make built buffers (one pair per layer) prompt slot `slot`'s memory of `length` text
        positions, between forwards; returns the pairs the slot held (to build the next prompt into)."""
        old = [block.cross_attn.cache.install(slot, pair) for block, pair in zip(self.blocks, buffers, strict=True)]
        self.prompt_mix.set_length(slot, length)
        return old

    def set_prompt_weights(self, weights) -> tuple[float, ...]:
        """Blend the prompt slots by `weights` (one per slot, normalised); returns the weights in force."""
        return self.prompt_mix.set_weights(weights)

    # -- hook points -----------------------------------------------------------

    def hook_names(self) -> list[str]:
        return [f"blocks.{i}.{kind}" for i in range(len(self.blocks)) for kind in HOOK_KINDS]

    def _hook_slot(self, name: str) -> tuple[Block, str]:
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOK_KINDS:
            raise KeyError(f"unknown hook point {name!r}; names look like blocks.<i>.<{'|'.join(HOOK_KINDS)}>")
        index = int(parts[1])
        if index >= len(self.blocks):
            raise KeyError(f"hook point {name!r}: the model has {len(self.blocks)} blocks")
        return self.blocks[index], parts[2]

    # Hooks at one point run in `order`: a hook's `order` attribute, lower first, ties in the
    # order attached; a hook without one (a plain callable) has order 1, an observer. Steering
    # hooks declare a lower order, so they run first and observers see the steered state
    # whatever order the two were attached in. The decoder reads only the attribute.

    @staticmethod
    def hook_order(hook: Hook) -> int:
        return getattr(hook, "order", 1)

    def set_hook(self, name: str, hook: Hook | None) -> None:
        """Make `hook(h) -> h` the only hook at a named point; None removes every hook there."""
        block, kind = self._hook_slot(name)
        with _HOOK_WRITES:
            if hook is None:
                block.hooks.pop(kind, None)
            else:
                block.hooks[kind] = [hook]

    def add_hook(self, name: str, hook: Hook) -> None:
        """Add `hook` at a named point, after the hooks there of its order or lower and before those
        of a higher order (steering before observers)."""
        block, kind = self._hook_slot(name)
        with _HOOK_WRITES:  # a new list: a forward holding the old one keeps it whole
            hooks = list(block.hooks.get(kind, ()))
            insort_right(hooks, hook, key=self.hook_order)
            block.hooks[kind] = hooks

    def remove_hook(self, name: str, hook: Hook) -> None:
        block, kind = self._hook_slot(name)
        with _HOOK_WRITES:
            hooks = [h for h in block.hooks.get(kind, ()) if h is not hook]
            if hooks:
                block.hooks[kind] = hooks
            else:
                block.hooks.pop(kind, None)

    def clear_hooks(self) -> None:
        with _HOOK_WRITES:
            for block in self.blocks:
                block.hooks.clear()

    @contextmanager
    def hooked(self, hooks: Mapping[str, Hook]) -> Iterator["MusicGen"]:
        """Install hooks for the duration of a `with` block, then restore what was there."""
        saved = {}
        for name in hooks:
            block, kind = self._hook_slot(name)
            saved[name] = list(block.hooks.get(kind, []))
        try:
            for name, hook in hooks.items():
                self.set_hook(name, hook)
            yield self
        finally:
            for name, previous in saved.items():
                block, kind = self._hook_slot(name)
                if previous:
                    block.hooks[kind] = previous
                else:
                    block.hooks.pop(kind, None)

    # -- forward -----------------------------------------------------------------

    def embed_codes(self, codes: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Summed codebook embeddings plus positions: codes (B, K, T) -> (B, T, D)."""
        x = self.embed(codes + self.codebook_offset).sum(dim=1)  # (B, T, D)
        return x + self.positions[input_pos]

    def forward(self, codes: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                use_cache: bool = True) -> torch.Tensor:
        """Logits (B, T, K, V) for codes (B, K, T) at positions `input_pos` (T,).

        With the cache: `kv_len` (a Python int, the number of filled positions after
        this call) makes attention read only the filled part; None reads the whole
        static cache under a mask, with shapes that never change (for graph capture).
        """
        x = self.hidden_states(codes, input_pos, kv_len, use_cache)
        return self.logits(x)

    def hidden_states(self, codes: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                      use_cache: bool = True) -> torch.Tensor:
        """Final-norm hidden states (B, T, D); same arguments as `forward`."""
        x = self.embed_codes(codes, input_pos)
        mask, pos = None, (input_pos if use_cache else None)
        if use_cache:
            length = kv_len if kv_len is not None else self.blocks[0].self_attn.cache.max_len
            if kv_len is not None and kv_len == codes.shape[-1] > 1:  # a prompt from position 0: fused causal
                mask = CAUSAL
            elif kv_len is None or codes.shape[-1] > 1:  # the one-token eager step sees all filled slots: no mask
                mask = torch.arange(length, device=codes.device)[None, :] <= input_pos[:, None]  # (T, L)
        static = use_cache and kv_len is None
        stack = self.fused_stack
        if stack is not None and use_cache and stack.takes(x, kv_len, mask):
            x = stack(x, input_pos, kv_len)
        else:
            for block in self.blocks:
                x = block(x, pos, kv_len, mask, static)
        return self.norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return self.heads(x).view(B, T, self.cfg.codebooks, self.cfg.vocab)  # (B, T, K, V)

    def step(self, codes: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """One token per row: codes (B, K, 1) at `input_pos` (1,) -> logits (B, K, V)."""
        return self.forward(codes, input_pos, kv_len)[:, 0]

    def prefill(self, codes: torch.Tensor) -> torch.Tensor:
        """Run a prompt of codes (B, K, T) from position 0, filling the cache; logits (B, T, K, V)."""
        T = codes.shape[-1]
        return self.forward(codes, torch.arange(T, device=codes.device), kv_len=T)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "MusicGen":
        """Random weights with the real shapes (for presets): normal(0, std) projections, unit-variance
        code embeddings (as large as the positions, so hidden states depend on the codes, as in a
        trained model), norms at identity."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name == "embed.weight" else std))
        return self


class PromptMemory(nn.Module):
    """What building a prompt's cross-attention memory reads, and nothing more: the decoder's text
    projection and every layer's key/value projection (its own modules, held, never copied) and the
    shape of a prompt slot. `build_memory` is the one code that builds a memory, whether on the
    decoding thread, a worker thread, or a worker process this is pickled to (its tensors shared,
    live/prompt_process.py), so a memory is the same bits wherever it was built."""

    def __init__(self, decoder: MusicGen) -> None:
        super().__init__()
        if decoder.prompt_mix is None:
            raise ValueError("call setup_caches() before building prompt memories")
        cfg, cache = decoder.cfg, decoder.blocks[0].cross_attn.cache
        self.text_proj = decoder.text_proj
        self.wkv = nn.ModuleList(block.cross_attn.wkv for block in decoder.blocks)
        self.heads, self.head_dim, self.batch = cfg.heads, cfg.head_dim, decoder.batch
        self.shape, self.dtype, self.device = cache.shape, cache.dtype, cache.device  # a slot's (B, H, max_text, hd)
        self.weight_dtype = decoder.embed.weight.dtype

    @property
    def max_text(self) -> int:
        return self.shape[2]

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair of zeroed slot-shaped buffers."""
        return (torch.zeros(self.shape, dtype=self.dtype, device=self.device),
                torch.zeros(self.shape, dtype=self.dtype, device=self.device))

    @torch.no_grad()
    def build_memory(self, text: torch.Tensor, mask: torch.Tensor, buffers: list | None = None) -> list:
        """Every layer's keys and values of a condition (B, S, text_hidden) in slot-shaped pairs
        (`buffers`, one per layer, reused; None or a None pair: new ones). Returns the pairs."""
        assert text.shape[0] == self.batch, f"condition has {text.shape[0]} rows, caches hold {self.batch}"
        if text.shape[1] > self.max_text:
            raise ValueError(f"prompt has {text.shape[1]} text tokens; the cache holds {self.max_text}")
        states = project_text(self.text_proj, self.weight_dtype, text, mask)
        out = []
        for i, wkv in enumerate(self.wkv):
            pair = buffers[i] if buffers is not None and buffers[i][0] is not None else self.empty()
            CrossCache.write(pair, *text_memory(wkv, self.heads, self.head_dim, states))
            out.append(pair)
        return out
