"""Threading model: a plan is built and then pushed to, reset and freed on one thread at a time
(the codec's owner: the producer thread in a live session); a push releases the GIL and runs its
large stages on the OpenMP team of the calling thread, the rest on that thread alone. A
`PushJob` runs once, later, inside a fused decoder call made by that same thread (as the call's
OpenMP thread 0, which is the caller), or on that thread when taken. Plans share nothing with
each other.

The C plan of a stateful streaming codec decoder (cpu_codec.c): stages added one by one over
weights this object keeps alive, buffers allocated once by `ready()`, then one call per decode.

It knows the stages' arithmetic (convolutions, transposed convolutions, LSTM, ELU, residual
sums) and nothing of EnCodec's modules: codec/native.py compiles a codec into a plan.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from . import cpu

FORMS = {"plain": 0, "f32": 1, "int8": 2}  # row-major (N, D); packed [N/16][D][16]; int8 packed with scales
PADS = {"zero": 0, "constant": 0, "reflect": 1, "replicate": 2}
ERRORS = {-1: "this build has no int8 kernels", -2: "a shape or an argument the plan does not take",
          -3: "out of memory", -4: "more samples than the output holds"}

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "ms_codec_new": ([_I, _I, _I, _I], _P),
    "ms_codec_book": ([_P, _P], _I),
    "ms_codec_conv": ([_P] + [_I] * 8 + [_P, _P], _I),
    "ms_codec_convt": ([_P] + [_I] * 7 + [_P, _P, _P], _I),
    "ms_codec_lstm": ([_P, _I], _I),
    "ms_codec_lstm_layer": ([_P, _I, _P, _P, _I, _P, _P, _P], _I),
    "ms_codec_elu": ([_P, _I, _F], _I),
    "ms_codec_open": ([_P, _I], _I),
    "ms_codec_close": ([_P, _I], _I),
    "ms_codec_ready": ([_P], _I),
    "ms_codec_out_cap": ([_P], _I),
    "ms_codec_reset": ([_P], None),
    "ms_codec_push": ([_P, _P, _I, _I, _P, _I], _I),
    "ms_codec_free": ([_P], None),
    "ms_codec_times": ([_P, _P, _P], _I),
    "ms_codec_parallel": ([_P, ctypes.c_double], ctypes.c_double),
    "ms_codec_run": ([_P], None),
}
KINDS = {1: "conv", 2: "convt", 3: "lstm", 4: "elu", 5: "open", 6: "close"}
_bound: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _bound
    lib = cpu.library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not in use: {cpu.unavailable()}")
    if _bound is not lib:  # set the signatures once per loaded library
        for name, (args, res) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _bound = lib
    return lib


class PlanError(RuntimeError):
    """The C plan refused a stage or a call (its code says why)."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise PlanError(f"{what}: {ERRORS.get(rc, f'error {rc}')}")
    return rc


class Matrix:
    """A weight (N, D) float32 in the form the plan reads it: "f32" packed (N a multiple of 16),
    "int8" quantized per output and packed (N of 16s, D of 64s), else "plain"."""

    def __init__(self, weight: torch.Tensor, int8: bool = False) -> None:
        w = weight.detach().float().contiguous()
        n, d = w.shape
        self.scale: torch.Tensor | None = None
        if int8:
            self.form = "int8"
            self.data, self.scale = cpu.quantize_pack_i8(w)
        elif n % cpu.BLOCK == 0:
            self.form, self.data = "f32", cpu.pack_f32(w)
        else:
            self.form, self.data = "plain", w

    @property
    def args(self) -> tuple[int, int, int | None]:
        return FORMS[self.form], self.data.data_ptr(), None if self.scale is None else self.scale.data_ptr()


class _Job(ctypes.Structure):
    """Mirror of `ms_codec_job` in cpu_codec.c."""

    _fields_ = [("plan", _P), ("codes", _P), ("n", _I), ("end", _I), ("out", _P), ("cap", _I), ("result", _I),
                ("done", _I), ("seconds", ctypes.c_double)]


class PushJob:
    """A push prepared to run later, inside a decoder step's C call: `function` and `address` are
    what the step takes to run it on its thread 0 (FusedStack.side), `run()` runs it here if nothing has, and
    `take()` gives its samples as `CodecPlan.push` returns them. The plan holds one output buffer:
    take a job before the next push."""

    def __init__(self, plan: "CodecPlan", codes: np.ndarray, end: bool) -> None:
        self.plan, self.codes = plan, np.ascontiguousarray(codes, dtype=np.int64)  # held while the job may run
        n = self.codes.shape[1] if self.codes.ndim == 2 else 0
        self.job = _Job(plan._plan, self.codes.ctypes.data if n else None, n, int(end), plan.out.ctypes.data,
                        plan.out.shape[0], 0, 0, 0.0)
        self.address = ctypes.addressof(self.job)
        self.function = ctypes.cast(plan._lib.ms_codec_run, ctypes.c_void_p).value

    @property
    def done(self) -> bool:
        return bool(self.job.done)

    @property
    def seconds(self) -> float:
        """How long the push took, wherever it ran."""
        return self.job.seconds

    def run(self) -> None:
        if not self.job.done:
            self.plan._lib.ms_codec_run(self.address)

    def take(self) -> np.ndarray:
        self.run()
        return self.plan.out[:_check(self.job.result, f"push of {self.job.n} frames")].copy()


class CodecPlan:
    """Stages in order (conv, convt, lstm, elu, open ... close), then `ready()`, then `push`."""

    def __init__(self, dim: int, bins: int, max_frames: int, threads: int = 0) -> None:
        self._lib = _library()
        self._keep: list[torch.Tensor] = []  # every array the plan points into
        self._plan = self._lib.ms_codec_new(dim, bins, max_frames, threads)
        if not self._plan:
            raise PlanError("out of memory")
        self.dim, self.max_frames = dim, max_frames
        self.stages = 0
        self.out: np.ndarray | None = None

    def _hold(self, *tensors: torch.Tensor | None) -> None:
        self._keep.extend(t for t in tensors if t is not None)

    def book(self, table: torch.Tensor) -> None:
        """A codebook (bins, dim): the quantizer sums one entry of each per frame, in order."""
        table = table.detach().float().contiguous()
        self._hold(table)
        _check(self._lib.ms_codec_book(self._plan, table.data_ptr()), "codebook")

    def conv(self, weight: torch.Tensor, bias: torch.Tensor, dilation: int, left: int, right: int, mode: str) -> None:
        """A convolution of stride 1, weight (C_out, C_in, k), padded at the clip's ends with `mode`."""
        c_out, c_in, k = weight.shape
        m = Matrix(weight.permute(0, 2, 1).reshape(c_out, k * c_in))  # inputs ordered (tap, channel)
        bias = bias.detach().float().contiguous()
        self._hold(m.data, bias)
        form, w, _ = m.args
        _check(self._lib.ms_codec_conv(self._plan, c_in, c_out, k, dilation, left, right, PADS[mode], form, w,
                                       bias.data_ptr()), f"convolution {c_in} -> {c_out}, k={k}")
        self.stages += 1

    def convt(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, left: int, right: int,
              int8: bool = False) -> None:
        """A transposed convolution, weight (C_in, C_out, k); `left` + `right` output samples trimmed."""
        c_in, c_out, k = weight.shape
        m = Matrix(weight.permute(2, 1, 0).reshape(k * c_out, c_in), int8)  # rows ordered (tap, channel)
        bias = bias.detach().float().contiguous()
        self._hold(m.data, m.scale, bias)
        form, w, scale = m.args
        _check(self._lib.ms_codec_convt(self._plan, c_in, c_out, k, stride, left, right, form, w, scale,
                                        bias.data_ptr()), f"transposed convolution {c_in} -> {c_out}, k={k}")
        self.stages += 1

    def lstm(self, dim: int, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int8: bool = False) -> None:
        """An LSTM of `dim` units plus its input (the skip); per layer (W_ih, W_hh, b_ih + b_hh)."""
        _check(self._lib.ms_codec_lstm(self._plan, dim), "LSTM")
        self.stages += 1
        for w_ih, w_hh, bias in layers:
            ih, hh = Matrix(w_ih, int8), Matrix(w_hh, int8)
            bias = bias.detach().float().contiguous()
            self._hold(ih.data, ih.scale, hh.data, hh.scale, bias)
            _check(self._lib.ms_codec_lstm_layer(self._plan, *ih.args, *hh.args, bias.data_ptr()), "LSTM layer")

    def elu(self, dim: int, alpha: float) -> None:
        _check(self._lib.ms_codec_elu(self._plan, dim, alpha), "ELU")
        self.stages += 1

    def open(self, dim: int) -> None:
        """A residual block starts: its input is held until `close` adds it to the block's output."""
        _check(self._lib.ms_codec_open(self._plan, dim), "residual block")
        self.stages += 1

    def close(self, dim: int) -> None:
        _check(self._lib.ms_codec_close(self._plan, dim), "end of a residual block")
        self.stages += 1

    def ready(self) -> None:
        _check(self._lib.ms_codec_ready(self._plan), "plan")
        self.out = np.empty(_check(self._lib.ms_codec_out_cap(self._plan), "plan"), dtype=np.float32)

    def reset(self) -> None:
        self._lib.ms_codec_reset(self._plan)

    def parallel_from(self, work: float = 0.0) -> float:
        """The work (multiply-adds, a weight byte read counting as one) from which a stage splits over
        the threads; with `work`, set it. Returns the value before."""
        return self._lib.ms_codec_parallel(self._plan, work)

    def push(self, codes: np.ndarray, end: bool = False) -> np.ndarray:
        """Codes (books, n) int64 -> the newly final samples (a copy); with `end`, the rest of the
        clip too, and the plan starts a new clip after it."""
        codes = np.ascontiguousarray(codes, dtype=np.int64)
        n = codes.shape[1] if codes.ndim == 2 else 0
        got = self._lib.ms_codec_push(self._plan, codes.ctypes.data if n else None, n, int(end),
                                      self.out.ctypes.data, self.out.shape[0])
        return self.out[:_check(got, f"push of {n} frames")].copy()

    def job(self, codes: np.ndarray, end: bool = False) -> PushJob:
        """`push(codes, end)` as a job to run later, inside a decoder step's call (PushJob)."""
        return PushJob(self, codes, end)

    def times(self) -> list[tuple[str, float]]:
        """(kind, seconds) per stage over the pushes since the last call; the clocks restart."""
        count = self.stages
        seconds, kinds = np.zeros(count), np.zeros(count, dtype=np.int32)
        n = self._lib.ms_codec_times(self._plan, seconds.ctypes.data, kinds.ctypes.data)
        return [(KINDS[int(k)], float(t)) for k, t in zip(kinds[:n], seconds[:n])]

    def __del__(self) -> None:
        plan, self._plan = getattr(self, "_plan", None), None
        if plan:
            self._lib.ms_codec_free(plan)
