"""Threading model: as the decoder's forward (one thread at a time); `install` and
`uninstall` run while no forward does.

The CUDA backend's attention: the static (graph) step's self-attention through the
Triton decode kernel (kernels/triton_attention.py), applied by swapping the classes of
a decoder's layers in place (`install`).

The kernel runs where `kernels.dispatch.backend_for` says Triton (CUDA tensors with Triton
installed, or a test's `use_backend('triton')` under Triton's interpreter). The static step has fixed shapes: it attends over the whole cache. The reference path
masks the slots past the position; the kernel reads the filled length from the
position tensor instead and ignores the mask, so a captured graph replays at any
position. Every other call takes the reference path of model/musicgen.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...kernels.dispatch import backend_for
from ...model.musicgen import SelfAttention


class TritonSelfAttention(SelfAttention):
    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None, kv_len: int | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        if not (T == 1 and kv_len is None and input_pos is not None and backend_for(x.device) == "triton"):
            return super().forward(x, input_pos, kv_len, mask)
        from ...kernels.triton_attention import decode_attention  # Triton is imported on CUDA only

        q, k, v = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, 1, hd)
        k, v = self.cache.update(input_pos, k, v)  # (B, H, L, hd)
        out = decode_attention(q, k, v, input_pos + 1)  # the filled length, from the position tensor
        return self.wo(out.transpose(1, 2).reshape(B, T, D))


def install(decoder: nn.Module) -> Callable[[], None]:
    """Swap every self-attention layer below `decoder` for the Triton form (whatever form it had);
    returns what puts the previous classes back."""
    saved = [(m, type(m)) for m in decoder.modules() if isinstance(m, SelfAttention)]
    for module, _ in saved:
        module.__class__ = TritonSelfAttention

    def undo() -> None:
        for module, cls in saved:
            module.__class__ = cls
    return undo
