"""The GPU step's attention kernel: equal to SDPA over the filled part of the cache, with the
length read from a device tensor; in CI it runs in Triton's interpreter on CPU tensors."""

import pytest
import torch

from musicsteer.kernels import use_backend

pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it)")
from musicsteer.kernels.triton_attention import decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # natively on CUDA, interpreted on CPU


@pytest.mark.parametrize("batch,heads,hd,max_len,length,splits", [
    (2, 4, 16, 64, 1, None), (2, 4, 16, 64, 64, None), (1, 2, 64, 300, 173, 4), (2, 3, 12, 40, 17, 8),
    (2, 2, 64, 1500, 1001, None)])
def test_decode_attention_equals_sdpa_over_the_filled_part(batch, heads, hd, max_len, length, splits):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, 1, hd, generator=g) * 2
    k = torch.randn(batch, heads, max_len, hd, generator=g)
    v = torch.randn(batch, heads, max_len, hd, generator=g)
    k[:, :, length:] = float("nan")  # never read
    v[:, :, length:] = float("nan")
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    got = decode_attention(q, k, v, torch.tensor([length], device=DEVICE), splits=splits)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, test_graph_step's capture test covers the kernel natively")
def test_the_static_step_with_the_kernel_equals_the_masked_step(tiny):
    from musicsteer.backends.cuda import attention as cuda_attention
    from musicsteer.kernels import triton_attention
    from musicsteer.model.graph_step import GraphedStep

    dec = tiny.decoder
    g = torch.Generator().manual_seed(1)
    text, mask = torch.randn(2, 5, tiny.cfg.text_hidden, generator=g), torch.ones(2, 5, dtype=torch.bool)
    codes = torch.randint(0, tiny.cfg.vocab, (6, 2, tiny.cfg.codebooks, 1), generator=g)
    outs = []
    undo = cuda_attention.install(dec)  # the CUDA backend's attention, on CPU tensors
    try:
        for backend in ("torch", "triton"):
            dec.setup_caches(2, max_len=16, max_text=8)
            dec.set_condition(text, mask)
            step = GraphedStep(dec, 2)
            with use_backend(backend), torch.no_grad():
                outs.append(torch.stack([step(codes[t], t).clone() for t in range(6)]))
        calls = []
        original = triton_attention.decode_attention
        with use_backend("triton"), torch.no_grad():
            triton_attention.decode_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
            try:
                step(codes[0], 0)
            finally:
                triton_attention.decode_attention = original
        assert len(calls) == tiny.cfg.layers  # the kernel, not the reference, ran the static step
    finally:
        undo()
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
