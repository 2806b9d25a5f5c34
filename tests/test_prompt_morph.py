"""Prompt morphing in the decoder (model/kv_cache.py PromptMix, model/musicgen.py attend_text, the CPU
attention and fused C paths): weights (1, 0) give the single prompt's logits bit for bit in float32 on
every path, a blend is the weighted sum of the per-prompt attentions, the unconditional CFG row stays
unconditional, and a prompt built off the decoding thread equals one set in place."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from musicsteer.backends.cpu import attention as cpu_attention
from musicsteer.backends.cpu.fused import fuse_blocks
from musicsteer.backends.cpu.linear import fuse_activations, optimize_for_cpu
from musicsteer.model.config import PRESETS
from musicsteer.model.musicgen import MusicGen
from musicsteer.model.text import condition_rows

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler on this machine: the CPU kernels cannot be built")
CFG = PRESETS["tiny"]
PATHS = ["reference", "static", pytest.param("c-attention", marks=needs_cc), pytest.param("fused", marks=needs_cc)]


def texts(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` conditions of different lengths, as CFG rows (prompt; zeros)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        states = torch.randn(1, 5 + 2 * i, CFG.text_hidden, generator=g)
        out.append(condition_rows(states, torch.ones(1, 5 + 2 * i, dtype=torch.long), 2))
    return out


def decoder(path: str) -> MusicGen:
    model = MusicGen.random(CFG, seed=3)
    if path == "c-attention":
        cpu_attention.install(model)
    elif path == "fused":
        optimize_for_cpu(model, packed=True)
        fuse_activations(model)
    return model


def run(model: MusicGen, path: str, conditions, weights=None, steps: int = 10, built: bool = False) -> torch.Tensor:
    """Logits of `steps` one-token steps after a 4-position prompt of codes, with `conditions` in the
    prompt slots (built off-thread style with `built`) blended by `weights`."""
    model.setup_caches(2, max_len=32, max_text=16, prompts=len(conditions))
    for slot, (text, mask) in enumerate(conditions):
        if built:
            model.install_memory(slot, model.build_memory(text, mask), text.shape[1])
        else:
            model.set_condition(text, mask, slot=slot)
    if weights is not None:
        model.set_prompt_weights(weights)
    if path == "fused":
        assert fuse_blocks(model) > 0
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, CFG.vocab, (1, CFG.codebooks, 4 + steps), generator=g).expand(2, -1, -1)
    out = []
    with torch.no_grad():
        model.prefill(codes[..., :4])
        for t in range(4, 4 + steps):
            kv_len = None if path == "static" else t + 1
            out.append(model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=kv_len))
    return torch.stack(out)


@pytest.mark.parametrize("path", PATHS)
def test_weights_one_zero_equal_the_single_prompt_bit_for_bit(path):
    a, b, c = texts(3)
    single_a = run(decoder(path), path, [a])
    single_b = run(decoder(path), path, [b])
    assert torch.equal(run(decoder(path), path, [a, b], (1.0, 0.0)), single_a)
    assert torch.equal(run(decoder(path), path, [a, b], (0.0, 1.0)), single_b)
    assert torch.equal(run(decoder(path), path, [a, b, c, a], (0.0, 3.0, 0.0, 0.0)), single_b)  # normalised to 1
    assert not torch.equal(run(decoder(path), path, [a, b], (0.5, 0.5)), single_a)


@pytest.mark.parametrize("path", PATHS)
def test_a_prompt_built_off_thread_equals_one_set_in_place(path):
    conditions = texts(2, seed=1)
    assert torch.equal(run(decoder(path), path, conditions, (0.25, 0.75), built=True),
                       run(decoder(path), path, conditions, (0.25, 0.75)))


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.1, 0.2, 0.3, 0.4), (0.0, 0.5, 0.0, 0.5)])
def test_every_path_blends_as_the_reference(path, weights):
    conditions = texts(len(weights), seed=2)
    expected = run(decoder("reference"), "reference", conditions, weights)
    torch.testing.assert_close(run(decoder(path), path, conditions, weights), expected, atol=2e-5, rtol=1e-5)


def test_a_blend_is_the_weighted_sum_of_each_prompts_attention_and_cfgs_null_row_stays_null():
    model = MusicGen.random(CFG, seed=3)
    model.setup_caches(2, max_len=8, max_text=16, prompts=3)
    conditions = texts(3, seed=4)
    for slot, (text, mask) in enumerate(conditions):
        model.set_condition(text, mask, slot=slot)
    model.set_prompt_weights((2.0, 0.0, 6.0))  # normalised: 0.25, 0, 0.75
    assert model.prompt_mix.host == (0.25, 0.0, 0.75)
    cross = model.blocks[0].cross_attn
    x = torch.randn(2, 1, CFG.hidden, generator=torch.Generator().manual_seed(5))
    q = cross.wq(x).view(2, 1, cross.heads, cross.head_dim).transpose(1, 2)
    parts = []
    for text, mask in conditions:
        k, v = cross.memory(model.text_proj(text) * mask[..., None])
        parts.append(F.scaled_dot_product_attention(q, k, v))
    expected = cross.wo((0.25 * parts[0] + 0.75 * parts[2]).transpose(1, 2).reshape(2, 1, CFG.hidden))
    with torch.no_grad():
        got = cross(x, static=False)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        assert torch.count_nonzero(got[1]) == 0  # the unconditional row attends to null text whatever the mix
        torch.testing.assert_close(cross(x, static=True), got, atol=1e-6, rtol=1e-5)


def test_weights_are_checked():
    model = MusicGen.random(CFG, seed=3)
    model.setup_caches(2, max_len=8, max_text=16, prompts=2)
    (text, mask), = texts(1)
    model.set_condition(text, mask, slot=0)
    with pytest.raises(ValueError, match="slot 2 holds no prompt"):
        model.set_prompt_weights((0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        model.set_prompt_weights((-1.0, 0.0))
    with pytest.raises(ValueError, match="2 non-negative numbers"):
        model.set_prompt_weights((1.0,))
    assert model.set_prompt_weights((0.0, 0.0)) == (1.0, 0.0)  # all zero: the mix stays
    with pytest.raises(ValueError, match="text tokens"):
        model.set_condition(torch.zeros(2, 17, CFG.text_hidden), torch.ones(2, 17), slot=1)


def test_a_copy_of_a_decoder_keeps_its_own_mix():
    model = MusicGen.random(CFG, seed=3)
    model.setup_caches(2, max_len=8, max_text=16, prompts=2)
    twin = copy.deepcopy(model)
    assert twin.blocks[0].cross_attn.cache.mix is twin.prompt_mix is not model.prompt_mix
