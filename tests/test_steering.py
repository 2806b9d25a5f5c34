"""Steering in the decoder: exactness at strength 0, effect when strong, conditional-only
rows, hook points, layer weights, the gate and the plan's determinism."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from musicsteer.model.generate import generate
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack
from musicsteer.steering.plan import (
    SteeringPlan,
    SteeringSettings,
    build_steering,
    gate_open,
    layer_weights,
)
from musicsteer.steering.schedules import ExpDecay, LinearUp

PROMPT = "warm lofi piano"
GREEDY = SamplingSettings(cfg=3.0, greedy=True)


@pytest.fixture(scope="module")
def pack(tiny):
    return ConceptPack.random(["cmaj", "gmaj", "fast"], tiny.cfg, "tiny", seed=4)


def run(tiny, pack=None, strengths=None, settings=SteeringSettings(), frames=12, sampling=GREEDY):
    if pack is None:
        return generate(tiny.decoder, tiny.text, PROMPT, frames, sampling, record_logits=True)
    steerer, plan = build_steering(tiny.decoder, pack, settings, sampling.batch)
    for name, value in (strengths or {}).items():
        plan.set_strength(name, value)
    with steerer:
        return generate(tiny.decoder, tiny.text, PROMPT, frames, sampling, record_logits=True,
                        before_step=lambda s: plan.write(s, steerer))


@pytest.mark.parametrize("mode", ["add", "norm", "clamp"])
@pytest.mark.parametrize("point", ["out", "attn"])
def test_strength_zero_is_bit_identical_to_no_steering(tiny, pack, mode, point):
    base = run(tiny)
    zero = run(tiny, pack, {"cmaj": 0.0}, SteeringSettings(mode=mode, point=point))
    assert torch.equal(zero.logits, base.logits) and torch.equal(zero.codes, base.codes)


@pytest.mark.parametrize("mode, strength", [("add", 20.0), ("norm", 2.0), ("clamp", 1.0)])
def test_a_strong_direction_changes_the_tokens(tiny, mode, strength):
    # clamp moves the component to its target; give it a target far from the states
    pack = ConceptPack.random(["cmaj"], tiny.cfg, "tiny", seed=4)
    pack.concepts["cmaj"] = replace(pack["cmaj"], targets=torch.full((tiny.cfg.layers,), 30.0))
    base = run(tiny)
    steered = run(tiny, pack, {"cmaj": strength}, SteeringSettings(mode=mode))
    assert not torch.equal(steered.codes, base.codes)


@pytest.mark.parametrize("point", ["out", "attn"])
def test_conditional_only_leaves_the_unconditional_row_untouched(tiny, pack, point):
    dec = tiny.decoder
    from musicsteer.model.generate import prepare

    codes = torch.full((2, 4, 1), 2048)
    prepare(dec, tiny.text, PROMPT, GREEDY, max_len=8)
    plain = dec.step(codes, torch.tensor([0]), kv_len=1)
    for rows, row_changed in (("cond", [True, False]), ("both", [True, True])):
        steerer, plan = build_steering(dec, pack, SteeringSettings(rows=rows, point=point), batch=2)
        plan.set_strength("gmaj", 10.0)
        plan.write(0, steerer)
        prepare(dec, tiny.text, PROMPT, GREEDY, max_len=8)
        with steerer:
            steered = dec.step(codes, torch.tensor([0]), kv_len=1)
        assert [not torch.equal(steered[r], plain[r]) for r in range(2)] == row_changed
    assert not any(b.hooks for b in dec.blocks)


def test_layer_weights():
    scores = np.array([0.2, 0.6, 1.0, 0.4])
    w = layer_weights(scores, SteeringSettings(layers="weighted", kappa=0.95))
    np.testing.assert_allclose(w, ((scores - 0.2) / 0.8) ** (1 / 0.95))
    assert layer_weights(scores, SteeringSettings(layers="top:2")).tolist() == [0, 1, 1, 0]
    assert layer_weights(scores, SteeringSettings(layers="all")).tolist() == [1, 1, 1, 1]
    assert layer_weights(np.ones(3), SteeringSettings()).tolist() == [1, 1, 1]


def test_gate_probability_and_determinism():
    s = SteeringSettings(gate=0.3, seed=9)
    draws = [gate_open(t, s) for t in range(4000)]
    assert draws == [gate_open(t, s) for t in range(4000)]  # a function of (seed, step)
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert draws != [gate_open(t, SteeringSettings(gate=0.3, seed=10)) for t in range(4000)]
    assert all(gate_open(t, SteeringSettings(gate=1.0)) for t in range(100))
    assert not any(gate_open(t, SteeringSettings(gate=0.0)) for t in range(100))


def test_plan_alpha_follows_the_formula():
    scores = np.array([[0.1, 0.5, 0.9], [0.9, 0.5, 0.1]])  # (K, L)
    settings = SteeringSettings(rows="cond", gate=0.5, seed=2)
    plan = SteeringPlan(["a", "b"], scores, settings, batch=2)
    plan.set_strength("a", 0.6)
    plan.set_strength("b", -0.3)
    plan.set_schedule("a", ExpDecay(0.99))
    plan.set_schedule("b", LinearUp(50))
    for t in range(0, 60, 7):
        alpha = plan.alpha(t)
        assert alpha.shape == (3, 2, 2)
        gate = float(gate_open(t, settings))
        w = np.stack([layer_weights(s, settings) for s in scores], axis=1)  # (L, K)
        want_row0 = w * np.array([0.6 * 0.99 ** t, -0.3 * min(t / 50, 1)]) * gate
        np.testing.assert_allclose(alpha[:, 0, :], want_row0, rtol=1e-6, atol=1e-7)
        assert (alpha[:, 1, :] == 0).all()  # unconditional row never steered
        assert ((alpha == 0).all() or gate == 1.0)  # one draw shared by every layer


def test_plan_writes_in_place_and_is_deterministic(tiny, pack):
    steerer, plan = build_steering(tiny.decoder, pack, SteeringSettings(gate=0.5, seed=1), batch=2)
    plan.set_strength("fast", 0.7)
    ptr = steerer.alpha.data_ptr()
    seen = []
    for t in range(20):
        plan.write(t, steerer)
        seen.append(steerer.alpha.clone())
    assert steerer.alpha.data_ptr() == ptr
    steerer2, plan2 = build_steering(tiny.decoder, pack, SteeringSettings(gate=0.5, seed=1), batch=2)
    plan2.set_strength("fast", 0.7)
    for t in range(20):
        plan2.write(t, steerer2)
        assert torch.equal(steerer2.alpha, seen[t])


def test_top_k_hooks_only_the_chosen_layers(tiny):
    pack = ConceptPack.random(["x"], tiny.cfg, "tiny")
    pack.concepts["x"] = replace(pack["x"], scores=torch.tensor([0.1, 0.9]))
    steerer, _ = build_steering(tiny.decoder, pack, SteeringSettings(layers="top:1"), batch=2)
    with steerer:
        assert [bool(b.hooks) for b in tiny.decoder.blocks] == [False, True]
    assert not any(b.hooks for b in tiny.decoder.blocks)


def test_sampled_render_with_steering_is_seed_deterministic(tiny, pack):
    sampling = SamplingSettings(seed=3)
    settings = SteeringSettings(gate=0.3, seed=3)
    a = run(tiny, pack, {"cmaj": 5.0}, settings, sampling=sampling)
    b = run(tiny, pack, {"cmaj": 5.0}, settings, sampling=sampling)
    assert torch.equal(a.codes, b.codes)


def test_bad_settings():
    for kwargs in (dict(mode="mul"), dict(rows="uncond"), dict(point="mlp"), dict(layers="top:0"),
                   dict(layers="best"), dict(gate=1.5), dict(kappa=0)):
        with pytest.raises(ValueError):
            SteeringSettings(**kwargs)
