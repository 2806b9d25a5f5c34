"""Reduced-precision weights (backends/cpu/bf16.py and int4.py, kernels/cpu_reduced.c and
cpu_block.c): each layer equals its dequantized reference, a decoder's fused step equals its
module path, and the fidelity against float32 (bench/fidelity.py) stays within thresholds."""

import dataclasses
import shutil

import pytest
import torch

from musicsteer.backends.cpu.bf16 import Bf16Linear, PackedBf16Linear, to_bf16
from musicsteer.backends.cpu.fused import KIND_BF16, KIND_I4, FusedStack, fuse_blocks, unfuse_blocks
from musicsteer.backends.cpu.int4 import Int4Linear, PackedInt4Linear, quantize_int4
from musicsteer.backends.cpu.linear import fuse_activations
from musicsteer.backends.select import BackendError, prepare
from musicsteer.bench.fidelity import measure
from musicsteer.kernels import cpu
from musicsteer.model.config import PRESETS, ModelConfig
from musicsteer.model.loading.load import load_model
from musicsteer.model.musicgen import MusicGen

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine: the CPU kernels cannot be built")
needs_vnni = pytest.mark.skipif(not cpu.has_int8(), reason="this CPU or build has no AVX-512 VNNI for the int8 kernel")

ODD = ModelConfig(hidden=96, layers=2, heads=2, ffn=192, vocab=40, codebooks=2, text_hidden=24,
                  max_positions=64, activation="gelu_tanh", name="odd")  # 48-wide heads, d % 32 != 0
# the fidelity shape: small's structure (4 codebooks of 2048), a sixth of its width, 4 layers
REDUCED = ModelConfig(hidden=256, layers=4, heads=4, ffn=1024, vocab=2048, codebooks=4, text_hidden=64,
                      max_positions=256, name="reduced")


def bf16_reference(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the kernel computes: x and W rounded to bfloat16 (nearest even), sums in float64."""
    return (x.bfloat16().double() @ weight.bfloat16().double().T).float()


@pytest.mark.parametrize("n,d", [(96, 256), (48, 72), (16, 2), (1024, 4096)])
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 37])
def test_bf16_layer_equals_its_rounded_reference(n, d, rows):
    g = torch.Generator().manual_seed(n + d + rows)
    w, x = torch.randn(n, d, generator=g) * 0.05, torch.randn(rows, d, generator=g)
    layer = PackedBf16Linear(w)
    torch.testing.assert_close(layer.weight, w.bfloat16().float(), atol=0, rtol=0)  # the pack is exact
    with torch.no_grad():
        got = layer(x)
    want = bf16_reference(w, x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # float32 sums in another order: within 1e-5 of the output's scale
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6
    # against the float32 product: bfloat16 has 8 bits of mantissa (2^-9 relative per rounding)
    assert ((got - x @ w.T).norm() / (x @ w.T).norm()) < 6e-3


def test_bf16_layer_fuses_its_activation():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 128, generator=g) * 0.1, torch.randn(2, 128, generator=g)
    layer = PackedBf16Linear(w)
    layer.fuse_activation("gelu")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.gelu(bf16_reference(w, x)), atol=2e-6, rtol=1e-5)


def test_without_kernels_the_torch_form_keeps_bfloat16_weights():
    m = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 32, bias=True))
    x = torch.randn(3, 64)
    want = m(x)
    to_bf16(m, packed=False)
    assert isinstance(m[0], Bf16Linear) and type(m[1]) is torch.nn.Linear
    assert m[0].weight_bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert ((m(x) - want).norm() / want.norm()) < 1e-2


def bf16_model(cfg: ModelConfig, seed: int = 0) -> MusicGen:
    model = MusicGen.random(cfg, seed=seed)
    to_bf16(model)
    model.cache_dtype = torch.bfloat16
    fuse_activations(model)
    return model


def steps(model: MusicGen, fused: bool, rows: int, n: int = 10, kind: int = KIND_BF16) -> torch.Tensor:
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    model.setup_caches(rows, max_len=32, max_text=9)
    text, mask = torch.randn(rows, 7, cfg.text_hidden, generator=g), torch.ones(rows, 7)
    mask[-1, 4:] = 0
    model.set_condition(text, mask)
    if fused:
        assert fuse_blocks(model) == cfg.layers
        assert all(f.kind == kind for f in model.fused_stack.fused)
    else:
        unfuse_blocks(model)
    codes = torch.randint(0, cfg.vocab, (rows, cfg.codebooks, 5 + n), generator=g)
    out = []
    with torch.no_grad():
        model.prefill(codes[..., :5])
        for t in range(5, 5 + n):
            out.append(model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1))
    return torch.stack(out)


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], ODD, dataclasses.replace(ODD, activation="relu")],
                         ids=["tiny", "odd", "relu"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fused_bf16_steps_equal_the_module_path(cfg, rows):
    model = bf16_model(cfg)
    want, got = steps(model, False, rows), steps(model, True, rows)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_the_backend_choice():
    for kw in (dict(weights="bf16"), dict(dtype=torch.bfloat16)):
        model = load_model("tiny", **kw)
        assert model.backend.name == "cpu-bf16" and model.backend.fused_blocks == model.cfg.layers
        assert model.decoder.embed.weight.dtype == torch.float32  # activations stay float32
        assert model.decoder.cache_dtype == torch.bfloat16
        assert isinstance(model.decoder.fused_stack, FusedStack)
    decoder = MusicGen.random(PRESETS["tiny"])
    with pytest.raises(BackendError, match="CPU option"):
        prepare(decoder, "meta", torch.float32, "bf16")
    with pytest.raises(BackendError, match="float32 activations"):
        prepare(decoder, "cpu", torch.float16, "bf16")


# Thresholds from runs of the reduced shape (seeds 0-2, 200 steps, guided entropy 3.9 nats):
# bf16 0.981-0.989 agreement, KL 1.5-1.6e-4; int8 0.948-0.955, KL 1.8-1.9e-3; int4 (int8 heads)
# 0.939-0.951, KL 2.7-2.9e-3 (with int4 heads too: 0.79-0.82, KL 0.043). A margin below each.
@pytest.mark.parametrize("weights,agreement,kl", [("bf16", 0.96, 5e-4),
                                                  pytest.param("int8", 0.92, 5e-3, marks=needs_vnni),
                                                  pytest.param("int4", 0.90, 8e-3, marks=needs_vnni)])
def test_fidelity_against_float32(weights, agreement, kl):
    f = measure(REDUCED, weights, steps=200)
    assert f.backend == f"cpu-{weights}" and f.steps == 200
    assert 2.0 < f.entropy < 6.0  # peaked like a trained model's, not uniform (log 2048 = 7.6)
    assert f.agreement >= agreement, f
    assert f.kl_mean <= kl, f


# The 8-bit KV cache on the same shape (seeds 0-1): with float32 weights 1.000 agreement, KL 2.8e-7;
# with int4 weights 0.946-0.951, KL 2.7-2.9e-3, as with its bfloat16 cache (0.945-0.951).
@pytest.mark.parametrize("weights,agreement,kl", [("full", 0.99, 1e-5), pytest.param("int4", 0.90, 8e-3, marks=needs_vnni)])
def test_fidelity_of_the_int8_kv_cache(weights, agreement, kl):
    f = measure(REDUCED, weights, steps=200, kv_cache="int8")
    assert f.kv_cache == "int8" and f.agreement >= agreement and f.kl_mean <= kl, f
    assert f.kl_mean > 0  # the cache really is quantized


# ---------------------------------------------------------------- int4

def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI kernels see it: symmetric int8 per row and group of 64 inputs, dequantized."""
    g = x.view(x.shape[0], -1, cpu.GROUP)
    scale = g.abs().amax(dim=2, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(g / scale).clamp(-127, 127) * scale).view_as(x)


@needs_vnni
@pytest.mark.parametrize("n,d", [(96, 256), (48, 64), (1024, 4096)])
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 37])
def test_int4_layer_equals_its_dequantized_reference(n, d, rows):
    g = torch.Generator().manual_seed(n + d + rows)
    w, x = torch.randn(n, d, generator=g) * 0.05, torch.randn(rows, d, generator=g)
    layer = PackedInt4Linear(w)
    q, scale = cpu.quantize_i4(w)
    assert layer.packed.numel() == n * d // 2 and q.abs().max() <= 7
    dq = layer.weight
    torch.testing.assert_close(dq, q.float() * scale.repeat_interleave(cpu.GROUP, dim=1), atol=0, rtol=0)
    with torch.no_grad():
        got = layer(x)
    want = (quantized_rows(x).double() @ dq.double().T).float()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-6  # exact integer sums, float32 scaling
    # against the float32 weights: 4 bits with a clipped scale per 64 inputs
    assert ((got - x @ w.T).norm() / (x @ w.T).norm()) < 0.15
    assert ((dq - w).norm() / w.norm()) < 0.12


@needs_vnni
@pytest.mark.parametrize("cfg", [PRESETS["tiny"], dataclasses.replace(ODD, hidden=128, heads=2, ffn=256)],
                         ids=["tiny", "odd"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fused_int4_steps_equal_the_module_path(cfg, rows):
    model = MusicGen.random(cfg, seed=0)
    quantize_int4(model)
    model.cache_dtype = torch.bfloat16
    fuse_activations(model)
    want, got = steps(model, False, rows, kind=KIND_I4), steps(model, True, rows, kind=KIND_I4)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_without_vnni_the_torch_form_keeps_the_int4_weights():
    w = torch.randn(32, 128)
    m = torch.nn.Sequential(torch.nn.Linear(128, 32, bias=False))
    m[0].weight.data.copy_(w)
    quantize_int4(m, packed=False)
    assert isinstance(m[0], Int4Linear)
    q, scale = cpu.quantize_i4(w)
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ (q.float() * scale.repeat_interleave(cpu.GROUP, dim=1)).T)
    assert load_model("tiny", weights="int4").backend.name == "cpu-int4"
