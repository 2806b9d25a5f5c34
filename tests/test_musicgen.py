"""The lean decoder: cache, prefill, static path and hook points."""

import pytest
import torch

from musicsteer.model.config import ModelConfig
from musicsteer.model.delay import interleave
from musicsteer.model.musicgen import MusicGen, sinusoid_table

CFG = ModelConfig(hidden=48, layers=3, heads=4, ffn=96, text_hidden=24, max_positions=64, name="test")


@pytest.fixture
def model():
    m = MusicGen.random(CFG, seed=3)
    with torch.no_grad():  # non-trivial norms and projection bias
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    fresh_caches(m)
    return m


def fresh_caches(m):
    """New caches holding the same condition: random text for row 0, the null text for row 1."""
    m.setup_caches(batch=2)
    text = torch.randn(2, 5, CFG.text_hidden, generator=torch.Generator().manual_seed(0))
    m.set_condition(text, torch.tensor([[1] * 5, [0] * 5]))


def sequence(frames=20, seed=1):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CFG.vocab, (CFG.codebooks, frames), generator=gen)
    return interleave(codes, CFG.special_token).expand(2, -1, -1)  # (2, K, P)


@torch.no_grad()
def test_cached_steps_equal_full_uncached_forward(model):
    seq = sequence()
    P = seq.shape[-1]
    full = model(seq, torch.arange(P), use_cache=False)  # (B, P, K, V)
    steps = torch.stack([model.step(seq[..., t : t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(P)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prefill_then_steps_equal_full_forward(model):
    seq = sequence()
    P = seq.shape[-1]
    full = model(seq, torch.arange(P), use_cache=False)
    head = model.prefill(seq[..., :10])
    tail = torch.stack([model.step(seq[..., t : t + 1], torch.tensor([t]), kv_len=t + 1) for t in range(10, P)], 1)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_static_shape_step_equals_eager_step(model):
    """kv_len=None reads the whole static cache under masks: the graph-capture path."""
    seq = sequence(frames=8)
    eager, static = [], []
    for t in range(seq.shape[-1]):
        eager.append(model.step(seq[..., t : t + 1], torch.tensor([t]), kv_len=t + 1))
    fresh_caches(model)
    for t in range(seq.shape[-1]):
        static.append(model.step(seq[..., t : t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.stack(static), torch.stack(eager), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_unconditional_row_ignores_text(model):
    """Row 1 has mask 0: its logits must not depend on the text states."""
    seq = sequence(frames=4)
    a = model.prefill(seq)
    model.set_condition(torch.randn(2, 5, CFG.text_hidden) * 5, torch.tensor([[1] * 5, [0] * 5]))
    b = model.prefill(seq)
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(a[0], b[0])


@torch.no_grad()
def test_hooks_are_called_at_every_point_and_change_the_output(model):
    seq = sequence(frames=4)[..., :1]
    base = model.step(seq, torch.tensor([0]), kv_len=1)
    seen = []

    def make(name):
        def hook(h):
            seen.append((name, tuple(h.shape)))
            return h + 0.5
        return hook

    hooks = {name: make(name) for name in model.hook_names()}
    with model.hooked(hooks):
        steered = model.step(seq, torch.tensor([0]), kv_len=1)
    assert [n for n, _ in seen] == model.hook_names()
    assert all(shape == (2, 1, CFG.hidden) for _, shape in seen)
    assert not torch.allclose(steered, base)
    assert all(not b.hooks for b in model.blocks)  # the context manager undid them
    again = model.step(seq, torch.tensor([0]), kv_len=1)
    torch.testing.assert_close(again, base)


@torch.no_grad()
def test_identity_hook_changes_nothing(model):
    seq = sequence(frames=4)[..., :1]
    base = model.step(seq, torch.tensor([0]), kv_len=1)
    model.set_hook("blocks.1.out", lambda h: h)
    assert torch.equal(model.step(seq, torch.tensor([0]), kv_len=1), base)
    model.set_hook("blocks.1.out", None)
    assert not model.blocks[1].hooks


def test_bad_hook_names_are_rejected(model):
    for name in ("blocks.9.out", "blocks.0.mlp", "layer.0.out", "blocks.x.out"):
        with pytest.raises(KeyError):
            model.set_hook(name, lambda h: h)


def test_positions_formulas_agree_closely():
    a = sinusoid_table(2048, 64, "transformers")
    b = sinusoid_table(2048, 64, "audiocraft")
    assert a.shape == (2048, 64)
    torch.testing.assert_close(a[:, :32], torch.cos(torch.arange(2048.0)[:, None] * a.new_tensor(
        [10000 ** (-i / 31) for i in range(32)])), atol=2e-3, rtol=0)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_caches_are_required():
    m = MusicGen.random(CFG)
    with pytest.raises(AssertionError):
        m.step(torch.zeros(1, 4, 1, dtype=torch.long), torch.tensor([0]), kv_len=1)


@pytest.mark.parametrize("rows", [1, 2, 4, 9])
def test_linear_fast_path_equals_f_linear(rows):
    from musicsteer.backends.cpu.linear import Linear

    lin = Linear(96, 40, bias=True)
    x = torch.randn(rows, 1, 96)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert lin(x).shape == (rows, 1, 40)


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_chunked_linear_equals_the_wide_layer(rows):
    from musicsteer.backends.cpu.linear import ChunkedLinear, Linear, optimize_for_cpu

    lin = Linear(256, 64, bias=False)
    x = torch.randn(rows, 1, 256)
    torch.testing.assert_close(ChunkedLinear(lin.weight)(x), lin(x), atol=1e-5, rtol=1e-5)
    model = torch.nn.Sequential(Linear(64, 256, bias=False), lin)
    optimize_for_cpu(model, packed=False)
    assert isinstance(model[0], Linear) and isinstance(model[1], ChunkedLinear)  # only the wide one
