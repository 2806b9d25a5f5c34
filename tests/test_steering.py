"""Steering in the decoder: exactness at strength 0, effect when strong, conditional-only
rows, hook points, layer weights, the gate (per step or per layer) and the plan's
determinism, strengths clamped to the mode's range, the record of every step's strengths
and the replay of recorded strengths over several positions."""

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
    gate_mask,
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


def test_the_gate_per_layer_draws_each_layer_and_concept_apart():
    """MusicRFM's gate: one draw per layer (and concept) per forward. Both gates keep the mean;
    the per-step one switches every layer at once, the per-layer one almost never does."""
    L, K, p = 24, 2, 0.3
    scores = np.ones((K, L))
    per_layer = SteeringPlan(["a", "b"], scores, SteeringSettings(gate=p, seed=3, gate_per="layer"), batch=2)
    per_step = SteeringPlan(["a", "b"], scores, SteeringSettings(gate=p, seed=3), batch=2)
    for plan in (per_layer, per_step):
        plan.set_strength("a", 1.0)
        plan.set_strength("b", 1.0)
    on_layer = np.stack([per_layer.alpha(t)[:, 0, :] for t in range(2000)])  # (T, L, K)
    on_step = np.stack([per_step.alpha(t)[:, 0, :] for t in range(2000)])
    assert abs(on_layer.mean() - p) < 0.02 and abs(on_step.mean() - p) < 0.03
    # per step: every layer and concept on together or off together
    assert all(len(np.unique(a)) == 1 for a in on_step)
    together = np.mean([len(np.unique(a)) == 1 for a in on_layer])
    assert together < 0.01
    # the per-layer draws are independent: layers 0 and 1 agree about p^2 + (1-p)^2 of the time
    agree = np.mean(on_layer[:, 0, 0] == on_layer[:, 1, 0])
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.04
    step_var = on_step.mean(axis=(1, 2)).var()
    layer_var = on_layer.mean(axis=(1, 2)).var()
    assert step_var > 10 * layer_var  # the step's mean strength swings far more with one draw per step
    # a function of (seed, step): replay and lookahead agree
    np.testing.assert_array_equal(gate_mask(17, per_layer.settings, (L, K)), gate_mask(17, per_layer.settings, (L, K)))
    assert (gate_mask(5, SteeringSettings(gate=1.0, gate_per="layer"), (L, K)) == 1).all()
    with pytest.raises(ValueError, match="use step or layer"):
        SteeringSettings(gate_per="block")


def test_strengths_outside_the_modes_range_are_clamped_with_one_log_line(caplog):
    scores = np.ones((1, 3))
    ablate = SteeringPlan(["a"], scores, SteeringSettings(mode="ablate"), batch=2)
    with caplog.at_level("WARNING", logger="musicsteer.steering"):
        ablate.set_strength("a", 2.0)
        ablate.set_strength("a", 1.5)  # a smoothed ramp sets it every step: logged once
    assert ablate.strengths[0] == 1.0
    assert len(caplog.records) == 1 and "ablate mode takes strengths in [0, 1], got 2" in caplog.text
    ablate.set_strength("a", -1.0)
    assert ablate.strengths[0] == 0.0 and len(caplog.records) == 1  # still out of range: not again
    ablate.set_strength("a", 0.5)
    ablate.set_strength("a", -1.0)
    assert len(caplog.records) == 2
    # a schedule cannot take the product out of range either
    ablate.set_strength("a", 1.0)
    ablate.set_schedule("a", lambda t: 3.0)
    assert ablate.alpha(0).max() == 1.0
    norm = SteeringPlan(["a"], scores, SteeringSettings(mode="norm"), batch=2)
    norm.set_strength("a", -1.0)  # norm takes either sign
    assert norm.strengths[0] == -1.0 and np.isfinite(norm.alpha(0)).all()


def test_render_refuses_a_strength_outside_the_mode(tiny, pack, tmp_path, capsys):
    from musicsteer.cli import main

    pack.save(tmp_path / "pack")
    args = ["render", "--model", "tiny", "--prompt", "x", "--duration", "0.1", "--no-progress", "--out",
            str(tmp_path / "o.wav"), "--concepts", str(tmp_path / "pack"), "--steer-mode", "ablate"]
    assert main(args + ["--steer", "cmaj=1.5"]) == 2
    err = capsys.readouterr().err
    assert "--steer cmaj=1.5: ablate mode takes strengths in [0, 1], got 1.5" in err and len(err.splitlines()) == 1
    assert main(args + ["--steer", "cmaj=0.5"]) == 0


def test_the_plan_records_the_strengths_every_step_was_written_with(tiny, pack):
    steerer, plan = build_steering(tiny.decoder, pack, SteeringSettings(gate=0.5, seed=4), batch=2)
    plan.keep_history(8)
    written = {}
    for t in range(20):
        plan.set_strength("cmaj", 0.1 * t)
        plan.write(t, steerer)
        written[t] = steerer.alpha.numpy().copy()  # (L, B, K)
    got = plan.recorded(14, 6)  # (L, B, 6, K)
    for j, t in enumerate(range(14, 20)):
        np.testing.assert_array_equal(got[:, :, j], written[t])
    assert (plan.recorded(3, 2) == 0).all()  # too old: not kept, read as unsteered
    assert any((written[t] == 0).all() for t in range(20)) and any((written[t] != 0).any() for t in range(20))


def test_replaying_steers_each_position_with_its_recorded_strengths(tiny, pack):
    """A forward over T positions inside `replaying` equals T one-position forwards, each with
    its own strengths in the buffer; outside it the buffer is back as it was."""
    decoder = tiny.decoder
    steerer, plan = build_steering(decoder, pack, SteeringSettings(layers="all"), batch=2)
    T = 5
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, tiny.cfg.vocab, (2, tiny.cfg.codebooks, T), generator=g)
    alphas = np.zeros((tiny.cfg.layers, 2, T, 3), dtype=np.float32)
    alphas[:, :, 1, 0] = 3.0
    alphas[:, :, 3, 2] = -2.0
    alphas[:, 0, 4, 1] = 1.5
    states, mask = tiny.text.encode(PROMPT)
    from musicsteer.model.text import condition_rows

    def prefill(run):
        decoder.setup_caches(2, max_len=T)
        decoder.set_condition(*condition_rows(states, mask, 2))
        with torch.inference_mode(), steerer:
            return run()

    steerer.alpha.fill_(7.0)  # whatever the current step holds: not what the replay uses

    def together():
        with steerer.replaying(alphas):
            return decoder.hidden_states(codes, torch.arange(T), kv_len=T)

    def one_by_one():
        out = []
        for t in range(T):
            steerer.alpha.copy_(torch.from_numpy(alphas[:, :, t]))
            out.append(decoder.hidden_states(codes[..., t:t + 1], torch.arange(t, t + 1), kv_len=t + 1))
        return torch.cat(out, dim=1)

    got = prefill(together)
    assert (steerer.alpha == 7.0).all()
    want = prefill(one_by_one)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    def unsteered():
        with steerer.replaying(np.zeros_like(alphas)):
            return decoder.hidden_states(codes, torch.arange(T), kv_len=T)

    steerer.alpha.fill_(7.0)
    plain = prefill(unsteered)
    assert (got - plain).abs().max() > 1e-3 and (steerer.alpha == 7.0).all()
    assert all(h.positions is None for h in steerer._hooks.values())
