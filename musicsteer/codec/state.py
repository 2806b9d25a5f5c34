"""Threading model: each stage and the decoder built from them belong to one thread (the
producer's): `push` and `flush` mutate the layers' past without a lock.

Stateful streaming EnCodec decode: every layer of the SEANet decoder keeps what it
needs of the past, so each frame is decoded once.

The offline decoder pads every convolution at both ends (reflect) and runs one LSTM over
the whole clip. Here each layer is a stage with `push(x) -> y`, which returns every
output sample that no later input can change, and `flush() -> y`, which pads the right
end as the offline decode does and returns the rest:

- a convolution keeps its last (k - 1) * dilation input samples and pads the clip's first
  samples once, as the offline decode pads them; its right padding is its look-ahead;
- a transposed convolution keeps the overlapping tail of its last output and trims the
  clip's first samples once, as the offline decode trims them;
- the LSTM carries its (h, c) state; ELU needs nothing; a residual block holds its
  shortcut until the block's look-ahead has caught up.

The emitted audio equals an offline decode of the whole stream to float32 round-off
(tests/test_codec_stream.py); `precision="int8"` reads the large weights (the LSTM, the
first transposed convolutions) as int8, at about 69 dB SNR on MusicGen's shape. The look-ahead is the sum of the layers' right paddings at
their rates: 2402 samples (3.75 frames) for the 32 kHz codec. A frame costs its own
decode instead of a window's, and its audio is emitted as soon as its last sample is
final (whole frames: a sink reads whole blocks).

It knows nothing of the decoder, the ring buffer or threads; one thread calls it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .codec import Codec
from .layers import PRECISIONS, NotStreamable, check_codec, check_lstm, conv_padding, transposed_trim


def _empty_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.new_zeros((x.shape[0], channels, 0))


FEW_ROWS = 32  # output samples up to which a convolution runs through the packed kernel (PACKED_ROWS)
MANY_SAMPLES = 128  # output samples from which one MKL product over im2col columns beats oneDNN


class _Conv:
    """EncodecConv1d, stride 1: pads the clip's start once, keeps (k - 1) * dilation samples."""

    def __init__(self, module) -> None:
        conv = module.conv
        self.module = module
        self.weight, self.bias, self.dilation = conv.weight.detach(), conv.bias.detach(), conv.dilation[0]
        self.left, self.right = conv_padding(module)
        self.span = self.left + self.right  # input samples an output reads besides its own position
        self.mode = module.pad_mode
        c_out, c_in, k = self.weight.shape
        self.kernel = k
        # Both products read the weight as one (C_out, C_in * k) matrix over im2col columns: for the
        # few output samples of a deep layer the packed kernel (columns (m, C_in, k)), for many
        # samples of a wide kernel one MKL product (columns (k, C_in, m)). oneDNN's convolution
        # costs more on both (the 2-core machine: 238 against 136 us at 8 samples of the 512-wide
        # layer, 151 against 80 us at 640 samples of the 64-wide one, 201 against 71 for the last).
        self.few = _matvec(self.weight.reshape(c_out, c_in * k)) if c_out % 16 == 0 else None
        self.wide = self.weight.permute(0, 2, 1).reshape(c_out, k * c_in).contiguous()  # (C_out, k * C_in)
        self.reset()

    def reset(self) -> None:
        self.buf: torch.Tensor | None = None
        self.started = False

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def delay(self, d: float) -> float:
        return d + self.right

    def _conv(self, x: torch.Tensor) -> torch.Tensor:  # (1, C_in, m + span) -> (1, C_out, m)
        m = x.shape[-1] - self.span
        if m <= 0:
            return _empty_like(x, self.out_channels)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            if self.few is not None and m <= FEW_ROWS:
                cols = x[0].t().unfold(0, self.span + 1, 1)[..., :: self.dilation].reshape(m, -1)  # (m, C_in * k)
                return (self.few(cols) + self.bias).t()[None]
            if m >= MANY_SAMPLES:
                d = self.dilation
                cols = torch.cat([x[0, :, j * d : j * d + m] for j in range(self.kernel)]) if self.kernel > 1 \
                    else x[0]  # (k * C_in, m)
                return torch.addmm(self.bias[:, None], self.wide, cols)[None]
        return F.conv1d(x, self.weight, self.bias, dilation=self.dilation)

    def _keep(self, x: torch.Tensor) -> None:
        self.buf = x[..., x.shape[-1] - self.span:] if self.span else None

    def push(self, x: torch.Tensor) -> torch.Tensor:  # (1, C_in, n) -> (1, C_out, m)
        if self.span == 0:
            return self._conv(x)
        buf = x if self.buf is None else torch.cat([self.buf, x], dim=-1)
        if not self.started:
            if buf.shape[-1] <= self.left:  # reflect padding reads left + 1 samples
                self.buf = buf
                return _empty_like(x, self.out_channels)
            buf = F.pad(buf, (self.left, 0), mode=_torch_mode(self.mode))
            self.started = True
        y = self._conv(buf)
        self._keep(buf)
        return y

    def flush(self) -> torch.Tensor:
        if self.buf is None:
            return self.weight.new_zeros((1, self.out_channels, 0))
        if not self.started:  # a clip shorter than the left padding: the offline layer as it is
            return self.module(self.buf)
        y = self._conv(F.pad(self.buf, (0, self.right), mode=_torch_mode(self.mode)))
        self.buf = None
        return y


def _torch_mode(mode: str) -> str:
    return "constant" if mode == "zero" else mode


FEW_SAMPLES = 32  # from here oneDNN's transposed convolution beats the product and fold on CPU


class _ConvTranspose:
    """EncodecConvTranspose1d: overlap-adds each call's output onto the last call's tail and
    trims the clip's first samples once. In `int8`, a weight-bound one (over LARGE_WEIGHT
    entries: the first two of the 32 kHz codec) reads its weight as int8 through the product."""

    def __init__(self, module, precision: str = "float32") -> None:
        conv = module.conv
        self.left, self.right = transposed_trim(module)
        self.weight, self.bias = conv.weight.detach(), conv.bias.detach()  # (C_in, C_out, k), (C_out,)
        self.stride, self.kernel = conv.stride[0], conv.kernel_size[0]
        c_in, c_out, k = self.weight.shape
        self.out_channels = c_out
        matrix = self.weight.reshape(c_in, c_out * k).t().contiguous()  # (C_out * k, C_in)
        self.reduced = reads_int8(matrix, precision)
        self.product = _product(matrix, precision if self.reduced else "float32")  # x (n, C_in) -> (n, C_out * k)
        self.reset()

    def reset(self) -> None:
        self.tail: torch.Tensor | None = None  # (1, C_out, kernel - stride): not yet final
        self.to_trim = self.left

    def delay(self, d: float) -> float:
        return d * self.stride + self.left

    def _trim(self, y: torch.Tensor) -> torch.Tensor:
        cut = min(self.to_trim, y.shape[-1])
        self.to_trim -= cut
        return y[..., cut:]

    def push(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if n == 0:
            return _empty_like(x, self.out_channels)
        if (n >= FEW_SAMPLES and not self.reduced) or x.device.type != "cpu":
            y = F.conv_transpose1d(x, self.weight, None, stride=self.stride)  # (1, C_out, n * stride + tail)
        else:
            # Each input sample's k outputs, overlap-added `stride` apart: oneDNN's transposed convolution
            # takes 10x longer on a few samples than this product (23 ms against 2 for two samples).
            z = self.product(x[0].t())  # (n, C_out * k)
            length = (n - 1) * self.stride + self.kernel
            y = F.fold(z.t()[None], output_size=(1, length), kernel_size=(1, self.kernel),
                       stride=(1, self.stride)).view(1, self.out_channels, length)
        if self.tail is not None:
            y[..., : self.tail.shape[-1]] += self.tail
        final = n * self.stride
        self.tail = y[..., final:]
        return self._trim(y[..., :final] + self.bias[:, None])

    def flush(self) -> torch.Tensor:
        if self.tail is None:
            return self.weight.new_zeros((1, self.out_channels, 0))
        y = self.tail[..., : self.tail.shape[-1] - self.right] + self.bias[:, None]
        self.tail = None
        return self._trim(y)


class _LSTM:
    """EncodecLSTM over a chunk's timesteps, its (h, c) carried from call to call.

    torch's LSTM re-lays out its weights on every call on CPU (about 40 ms for the 32 kHz
    codec's two 1024-wide layers). Here each layer is its input product for all of the
    call's timesteps at once (one pass over W_ih for the chunk), then one recurrent product
    per timestep, both through the packed C kernels where they build (`_product`). In
    `int8` both products read int8 weights (a quarter of the bytes, an approximation with
    its own tolerance: tests/test_codec_stream.py)."""

    def __init__(self, module, precision: str = "float32") -> None:
        lstm = module.lstm
        check_lstm(lstm)
        self.hidden = lstm.hidden_size
        self.layers = []
        for i in range(lstm.num_layers):
            w_ih, w_hh = (getattr(lstm, f"weight_{n}_l{i}").detach() for n in ("ih", "hh"))  # (4H, In), (4H, H)
            b = (getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")).detach()  # (4H,)
            self.layers.append((_product(w_ih, precision), _product(w_hh, precision), b))
        self.reset()

    def reset(self) -> None:
        self.h: list[torch.Tensor] | None = None
        self.c: list[torch.Tensor] | None = None

    def delay(self, d: float) -> float:
        return d

    def push(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[-1]
        if steps == 0:
            return x
        if self.h is None:
            zero = x.new_zeros((1, self.hidden))
            self.h, self.c = [zero] * len(self.layers), [zero] * len(self.layers)
        seq = x[0].t().contiguous()  # (T, C)
        inp = seq
        for i, (input_product, recurrent, bias) in enumerate(self.layers):
            projected = input_product(inp) + bias  # (T, 4H): every timestep's input product in one pass
            h, c = self.h[i], self.c[i]
            out = x.new_empty((steps, self.hidden))  # (T, H)
            for t in range(steps):
                gates = projected[t : t + 1] + recurrent(h)  # (1, 4H)
                ig, fg, gg, og = gates.chunk(4, dim=1)
                c = torch.sigmoid(fg) * c + torch.sigmoid(ig) * torch.tanh(gg)
                h = torch.sigmoid(og) * torch.tanh(c)
                out[t : t + 1] = h
            self.h[i], self.c[i] = h, c
            inp = out
        return (inp + seq).t()[None]  # (1, C, T)

    def flush(self) -> torch.Tensor | None:
        return None


LARGE_WEIGHT = 1 << 20  # entries from which a transposed convolution's cost is reading its weight


def _product(weight: torch.Tensor, precision: str = "float32"):
    """x (rows, In) -> x @ weight.T in `precision`: float32 through `_matvec`; int8 through the packed
    VNNI kernel where it builds (weights per output channel, activations per group of 64 inputs),
    else torch's int8 product on bfloat16 activations. A shape the int8 layout cannot take (outputs
    in blocks of 16, inputs in groups of 64) stays float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"codec precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not takes_int8(weight, precision):
        return _matvec(weight)
    from ..backends.cpu.int8 import Int8Linear, PackedInt8Linear, packed_int8_kernels
    from ..kernels import cpu as cpu_kernels

    return PackedInt8Linear(weight) if cpu_kernels.unavailable() is None and packed_int8_kernels() \
        else Int8Linear(weight)


def reads_int8(matrix: torch.Tensor, precision: str) -> bool:
    """Whether a transposed convolution's (C_out * k, C_in) matrix is read as int8 in `precision`:
    weight-bound (over LARGE_WEIGHT entries) and of the int8 layout."""
    return matrix.numel() >= LARGE_WEIGHT and takes_int8(matrix, precision)


def takes_int8(weight: torch.Tensor, precision: str) -> bool:
    """Whether `precision` asks for int8 and the (N, D) weight fits its layout on this device."""
    n, d = weight.shape
    return precision == "int8" and weight.device.type == "cpu" and n % 16 == 0 and d % 64 == 0


def _matvec(weight: torch.Tensor):
    """x (rows, In) -> x @ weight.T: through the packed C kernel for a few rows of float32 on CPU
    (streams the weight at close to the memory's speed), through torch otherwise."""
    from ..backends.cpu.linear import PACKED_ROWS
    from ..kernels import cpu as cpu_kernels

    n, d = weight.shape
    if not (weight.device.type == "cpu" and weight.dtype is torch.float32 and cpu_kernels.unavailable() is None
            and cpu_kernels.packable(n, d)):
        return lambda x: F.linear(x, weight)
    packed = cpu_kernels.pack_f32(weight)

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= PACKED_ROWS and not torch.is_grad_enabled():
            return cpu_kernels.linear_f32(packed, x.contiguous())
        return F.linear(x, weight)

    return product


class _Pointwise:
    """ELU, identity: nothing to keep."""

    def __init__(self, module) -> None:
        self.module = module

    def reset(self) -> None:
        pass

    def delay(self, d: float) -> float:
        return d

    def push(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def flush(self) -> torch.Tensor | None:
        return None


class _Chain:
    """Stages in sequence; flushing pushes each stage's rest into the next before flushing it."""

    def __init__(self, stages: list) -> None:
        self.stages = stages

    def reset(self) -> None:
        for s in self.stages:
            s.reset()

    def delay(self, d: float) -> float:
        for s in self.stages:
            d = s.delay(d)
        return d

    def push(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s.push(x)
        return x

    def flush(self) -> torch.Tensor | None:
        rest = None
        for s in self.stages:
            parts = [] if rest is None else [s.push(rest)]
            tail = s.flush()
            if tail is not None:
                parts.append(tail)
            rest = torch.cat(parts, dim=-1) if parts else None
        return rest


class _Residual:
    """EncodecResnetBlock: shortcut(x) + block(x), the shortcut held until the block's output
    for the same samples exists."""

    def __init__(self, module, precision: str = "float32") -> None:
        self.block = _Chain([_stage(m, precision) for m in module.block])
        self.shortcut = _stage(module.shortcut, precision)
        if self.shortcut.delay(0) != 0:
            raise NotStreamable("a residual shortcut with look-ahead")
        self.reset()

    def reset(self) -> None:
        self.block.reset()
        self.shortcut.reset()
        self.held: torch.Tensor | None = None

    def delay(self, d: float) -> float:
        return self.block.delay(d)

    def _join(self, a: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or a.shape[-1] == 0:
            return a
        m = a.shape[-1]
        out = self.held[..., :m] + a
        self.held = self.held[..., m:]
        return out

    def push(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shortcut.push(x)
        self.held = s if self.held is None else torch.cat([self.held, s], dim=-1)
        return self._join(self.block.push(x))

    def flush(self) -> torch.Tensor | None:
        return self._join(self.block.flush())


def _stage(module, precision: str = "float32"):
    name = type(module).__name__
    if name == "EncodecConv1d":
        return _Conv(module)
    if name == "EncodecConvTranspose1d":
        return _ConvTranspose(module, precision)
    if name == "EncodecLSTM":
        return _LSTM(module, precision)
    if name == "EncodecResnetBlock":
        return _Residual(module, precision)
    if isinstance(module, (torch.nn.ELU, torch.nn.Identity)):
        return _Pointwise(module)
    raise NotStreamable(f"no streaming form for {name}")


def _decoder_chain(codec: Codec, precision: str = "float32") -> _Chain:
    check_codec(codec, precision)
    return _Chain([_stage(m, precision) for m in codec.model.decoder.layers])


class StatefulDecoder:
    """Codes in, frame by frame; final audio out, sample-exact against the offline decode.

    `chunk` frames are decoded per call (fewer, larger calls cost less per frame); `precision`
    "int8" runs the LSTM's products and the weight-bound transposed convolutions on int8 weights (an
    approximation of the offline decode: tests/test_codec_stream.py states its tolerance)."""

    def __init__(self, codec: Codec, codebooks: int, chunk: int = 1, precision: str = "float32") -> None:
        if chunk < 1:
            raise ValueError("codec chunk must be >= 1")
        self.codec, self.codebooks, self.chunk, self.precision = codec, codebooks, chunk, precision
        self.chain = _decoder_chain(codec, precision)
        self.hop = codec.hop
        self.lookahead_samples = int(round(self.chain.delay(0.0)))  # the layers' right paddings at the output rate
        self.device = next(codec.model.parameters()).device
        self.reset()

    def reset(self) -> None:
        self.chain.reset()
        self.pending: list[torch.Tensor] = []
        self.total = 0  # frames pushed
        self.emitted_samples = 0
        self.partial: torch.Tensor | None = None  # final samples of a frame not yet whole

    @property
    def latency_frames(self) -> int:
        """Frames between a frame's arrival and the emission of its audio, at most."""
        return self.chunk - 1 + math.ceil(self.lookahead_samples / self.hop)

    @property
    def frames_until_decode(self) -> int:
        """Pushes until one decodes (1: the next)."""
        return self.chunk - len(self.pending)

    def warm_up(self) -> None:
        """Run a throwaway stream of silence through every call shape a stream meets (start-up,
        steady state, end), so the convolutions' first-use set-up stays off the playback."""
        zeros = torch.zeros(self.codebooks, dtype=torch.long)
        for _ in range(self.latency_frames + 3 * self.chunk + 2):
            self.push(zeros)
        self.flush()
        self.reset()

    def push(self, frame: torch.Tensor) -> np.ndarray | None:
        """Add one frame of codes (K,); return newly final audio, or None."""
        if not self._add(frame):
            return None
        return self._out(self._decode_pending())

    def _add(self, frame: torch.Tensor) -> bool:
        """Queue one frame; whether it completes a chunk (a decode is due)."""
        self.pending.append(frame)
        self.total += 1
        return len(self.pending) >= self.chunk

    @torch.no_grad()
    def flush(self) -> np.ndarray:
        """Audio of every sample not yet emitted, the clip's end padded as offline (end of stream).
        The layers are reset after it; `emitted_samples` keeps counting."""
        if self.total == 0:
            return np.zeros(0, dtype=np.float32)
        out = self._out(self._decode_end(), end=True)
        self.total = 0
        return out if out is not None else np.zeros(0, dtype=np.float32)

    def _decode_end(self) -> torch.Tensor:
        """The pending frames' audio and the rest of the clip's (1, 1, n); the layers reset after it."""
        head = [self._decode_pending()] if self.pending else []
        audio = torch.cat([*head, self.chain.flush()], dim=-1)  # the last layer is a conv
        self.chain.reset()
        return audio

    @torch.no_grad()
    def _decode_pending(self) -> torch.Tensor:
        codes = torch.stack(self.pending, dim=-1).to(device=self.device, dtype=torch.long)[:, None]  # (K, 1, n)
        self.pending = []
        embeddings = self.codec.model.quantizer.decode(codes)  # (1, D, n)
        return self.chain.push(embeddings)

    def _out(self, audio: torch.Tensor, end: bool = False) -> np.ndarray | None:
        """Whole frames of final audio; the final samples of a frame whose end is not final yet are
        held (a sink reads whole blocks, and the ring's fill level keeps its margin)."""
        audio = torch.cat([self.partial, audio[0, 0]]) if self.partial is not None else audio[0, 0]
        n = audio.shape[0] if end else audio.shape[0] // self.hop * self.hop
        self.partial = audio[n:] if n < audio.shape[0] else None
        if n == 0:
            return None
        self.emitted_samples += n
        return audio[:n].float().cpu().numpy()
