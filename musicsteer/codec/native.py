"""Threading model: a native decoder is created, pushed to and flushed on one thread (the
producer's), as the stateful decoder is; a push is one C call that releases the GIL and may run
its large stages on that thread's OpenMP team (the decoder step's, between two steps).

The stateful streaming decode as one C call per decode: the SEANet decoder compiled once into
a flat plan of stages (kernels/cpu_codec.c) with its weights packed and its state (each
convolution's last samples, each transposed convolution's overlap tail, the LSTM's (h, c), each
residual block's held input) in buffers allocated once.

It computes what state.py's StatefulDecoder computes, stage for stage (the same padding,
trimming and emission of whole frames; in `int8` the same quantized weights through the same
kernels), and is what the live stream runs where the CPU kernels build: per-call overhead of a
few dozen torch operations per frame was most of the Python decoder's time. Where they do not
build, or a layer has no native form, `NotNative` says why and the Python decoder runs.

It knows nothing of the decoder, the ring buffer or threads.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import cpu as cpu_kernels
from .codec import Codec
from .layers import PRECISIONS, NotStreamable, check_codec, check_lstm, conv_padding, transposed_trim
from .state import StatefulDecoder, reads_int8, takes_int8


class NotNative(RuntimeError):
    """The native plan cannot run this codec here (no C kernels, no int8 kernels for `int8`, a layer
    it has no form for): the Python stateful decoder runs it."""


def _compile(plan, module, precision: str, delay: float) -> float:
    """Add `module`'s stages to the plan; returns the look-ahead so far (samples at its output rate)."""
    from ..kernels.cpu_codec import PlanError

    name = type(module).__name__
    int8 = precision == "int8"
    try:
        if name == "EncodecConv1d":
            left, right = conv_padding(module)
            conv = module.conv
            plan.conv(conv.weight, conv.bias, conv.dilation[0], left, right, module.pad_mode)
            return delay + right
        if name == "EncodecConvTranspose1d":
            left, right = transposed_trim(module)
            conv = module.conv
            c_in, c_out, k = conv.weight.shape
            matrix = conv.weight.detach().reshape(c_in, c_out * k).t()  # state.py's (C_out * k, C_in): same rule
            plan.convt(conv.weight, conv.bias, conv.stride[0], left, right, reads_int8(matrix, precision))
            return delay * conv.stride[0] + left
        if name == "EncodecLSTM":
            lstm = module.lstm
            check_lstm(lstm)
            layers = [(getattr(lstm, f"weight_ih_l{i}"), getattr(lstm, f"weight_hh_l{i}"),
                       getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")) for i in range(lstm.num_layers)]
            plan.lstm(lstm.hidden_size, [tuple(t.detach() for t in layer) for layer in layers],
                      int8 and takes_int8(lstm.weight_hh_l0, precision))
            return delay
        if name == "EncodecResnetBlock":
            if not isinstance(module.shortcut, torch.nn.Identity):
                raise NotNative("a residual block with a convolution shortcut")
            dim = _width(module)
            plan.open(dim)
            for m in module.block:
                delay = _compile(plan, m, precision, delay)
            plan.close(dim)
            return delay
        if isinstance(module, torch.nn.ELU):
            plan.elu(plan.width, float(module.alpha))
            return delay
        if isinstance(module, torch.nn.Identity):
            return delay
    except PlanError as exc:
        raise NotNative(f"{name}: {exc}") from exc
    raise NotStreamable(f"no streaming form for {name}")


def _width(block) -> int:
    """A residual block's channels: its first convolution's input."""
    return next(m.conv.in_channels for m in block.block if type(m).__name__ == "EncodecConv1d")


class _Widths:
    """The plan with the channel count of the stage last added (an ELU takes its input's width)."""

    def __init__(self, plan, dim: int) -> None:
        self.plan, self.width = plan, dim

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def conv(self, weight, *args) -> None:
        self.plan.conv(weight, *args)
        self.width = weight.shape[0]

    def convt(self, weight, *args) -> None:
        self.plan.convt(weight, *args)
        self.width = weight.shape[1]


def compile_plan(codec: Codec, codebooks: int, chunk: int, precision: str, threads: int = 0):
    """The codec's quantizer and decoder as a plan for `chunk` frames per call, and its look-ahead
    in output samples."""
    check_codec(codec, precision)
    model = codec.model
    if next(model.parameters()).device.type != "cpu":
        raise NotNative("the codec is not on the CPU")
    if cpu_kernels.unavailable() is not None:
        raise NotNative(f"no C kernels: {cpu_kernels.unavailable()}")
    if precision == "int8" and not cpu_kernels.has_int8():
        raise NotNative("this CPU build has no int8 kernels")
    from ..kernels.cpu_codec import CodecPlan

    books = [layer.codebook.embed for layer in model.quantizer.layers[:codebooks]]
    if len(books) != codebooks:
        raise NotNative(f"the codec has {len(books)} codebooks, not {codebooks}")
    bins, dim = books[0].shape
    plan = _Widths(CodecPlan(dim, bins, chunk, threads), dim)
    for table in books:
        plan.book(table)
    delay = 0.0
    with torch.no_grad():
        for m in model.decoder.layers:
            delay = _compile(plan, m, precision, delay)
    from ..kernels.cpu_codec import PlanError

    try:
        plan.ready()
    except PlanError as exc:
        raise NotNative(str(exc)) from exc
    return plan.plan, int(round(delay))


class NativeDecoder(StatefulDecoder):
    """StatefulDecoder's contract (codes in frame by frame, whole frames of final audio out,
    `flush` ends the clip), each decode one C call. `threads`: how many threads a large stage may
    split over (0: the calling thread's OpenMP team). One is the default: on a host whose cores are
    busy with other work, every parallel region waits for a thread the scheduler may not run, and
    two threads cost 3x one (docs/benchmarks.md)."""

    def __init__(self, codec: Codec, codebooks: int, chunk: int = 1, precision: str = "float32",
                 threads: int = 1) -> None:
        if chunk < 1:
            raise ValueError("codec chunk must be >= 1")
        if precision not in PRECISIONS:
            raise ValueError(f"codec precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.codec, self.codebooks, self.chunk, self.precision = codec, codebooks, chunk, precision
        self.plan, self.lookahead_samples = compile_plan(codec, codebooks, chunk, precision, threads)
        self.hop = codec.hop
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.plan.reset()
        self.pending: list[torch.Tensor] = []
        self.total = 0
        self.emitted_samples = 0
        self.partial: np.ndarray | None = None

    def _codes(self) -> np.ndarray:
        codes = torch.stack(self.pending, dim=-1).numpy() if self.pending else np.zeros((self.codebooks, 0), np.int64)
        self.pending = []
        return codes  # (K, n)

    def _decode_pending(self) -> np.ndarray:
        return self.plan.push(self._codes())

    def begin_push(self, frame: torch.Tensor):
        """`push` in two halves, for a decode that runs on a decoder step's thread (FusedStack.side):
        the frame queued, and the decode it completes as a job (kernels/cpu_codec.py PushJob), or
        None when it completes none. Give the job to `end_push` before the next push."""
        return self.plan.job(self._codes()) if self._add(frame) else None

    def end_push(self, job) -> np.ndarray | None:
        """The job's audio, as `push` returns it (the job runs here if nothing ran it)."""
        return self._out(job.take())

    def _decode_end(self) -> np.ndarray:
        return self.plan.push(self._codes(), end=True)

    def _out(self, audio: np.ndarray, end: bool = False) -> np.ndarray | None:
        """As StatefulDecoder's, on the plan's samples: whole frames out, the rest held."""
        if self.partial is not None:
            audio = np.concatenate([self.partial, audio])
        n = audio.shape[0] if end else audio.shape[0] // self.hop * self.hop
        self.partial = audio[n:] if n < audio.shape[0] else None
        if n == 0:
            return None
        self.emitted_samples += n
        return audio[:n]

    def stage_seconds(self) -> list[tuple[str, float]]:
        """(kind, seconds) per stage of the plan since the last call: where a decode's time goes."""
        return self.plan.times()
