"""Steering kernels: the Triton kernel equals the torch reference (under
TRITON_INTERPRET=1 on CPU, natively on CUDA), and the reference follows the formulas."""

import pytest
import torch

from musicsteer.kernels import (
    ADD,
    CLAMP,
    NORM,
    backend_for,
    steer,
    steer_reference,
    use_backend,
)

triton = pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it)")
from musicsteer.kernels.triton_steer import steer_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def case(B, T, D, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=g) * 3).to(dtype)
    alpha = torch.randn(B, K, generator=g) * 0.5
    alpha[0, 0] = 0.0
    v = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1).to(dtype)
    c = torch.randn(K, generator=g)
    return [t.to(DEVICE) for t in (h, alpha, v, c)]


SHAPES = [  # (B, T, D, K): powers of two and not, one and many positions, 1..16 concepts
    (2, 1, 64, 1), (2, 1, 1024, 4), (2, 1, 1536, 16), (2, 1, 100, 3), (1, 1, 2048, 8),
    (2, 33, 96, 16), (2, 12, 1024, 1), (2, 7, 200, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [ADD, NORM, CLAMP], ids=["add", "norm", "clamp"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_equals_reference(shape, mode, dtype):
    h, alpha, v, c = case(*shape, dtype)
    want = steer_reference(h, alpha, v, c, mode)
    got = steer_triton(h.clone(), alpha, v, c, mode)
    assert got.dtype == dtype
    tol = TOL[dtype] * max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=TOL[dtype])


def test_reference_formulas_for_one_concept():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 32, generator=g)
    v = torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1)
    a = torch.tensor([[0.4]])
    torch.testing.assert_close(steer_reference(x, a, v, None, ADD), x + 0.4 * v)
    torch.testing.assert_close(steer_reference(x, a, v, None, NORM), (x + 0.4 * x.norm() * v) / 1.4)
    clamped = steer_reference(x, torch.ones(1, 1), v, torch.tensor([2.5]), CLAMP)
    torch.testing.assert_close((clamped @ v.T).squeeze(), torch.tensor(2.5))
    ortho = x - (x @ v.T) * v  # the rest of x is untouched
    torch.testing.assert_close(clamped - (clamped @ v.T) * v, ortho, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [ADD, NORM, CLAMP])
def test_zero_strength_is_exactly_identity(mode):
    h, alpha, v, c = case(2, 5, 100, 4, torch.float32)
    zero = torch.zeros_like(alpha)
    assert torch.equal(steer_reference(h, zero, v, c, mode), h)
    assert torch.equal(steer_triton(h.clone(), zero, v, c, mode), h)


def test_rows_are_independent():
    h, alpha, v, c = case(2, 3, 64, 2, torch.float32)
    alpha[1] = 0.0  # conditional-only steering
    out = steer_triton(h.clone(), alpha, v, c, ADD)
    assert torch.equal(out[1], h[1]) and not torch.equal(out[0], h[0])


def test_dispatch_chooses_once_and_can_be_forced(monkeypatch):
    assert backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("MUSICSTEER_KERNELS", "triton")
    assert backend_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv("MUSICSTEER_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MUSICSTEER_KERNELS"):
        backend_for(torch.device("cpu"))
    monkeypatch.delenv("MUSICSTEER_KERNELS")
    h, alpha, v, c = case(2, 1, 64, 3, torch.float32)
    with use_backend("triton"):
        a = steer(h.clone(), alpha, v, c, NORM)
    with use_backend("torch"):
        b = steer(h.clone(), alpha, v, c, NORM)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
