"""Guidance, filtering and seeded sampling, against their formulas."""

import pytest
import torch

from musicsteer.model.sampling import (
    SamplingSettings,
    cfg_mix,
    filter_logits,
    guided_logits,
    make_generator,
    sample,
)


def test_cfg_mix_formula():
    logits = torch.randn(2, 4, 16)
    torch.testing.assert_close(cfg_mix(logits, 3.0), logits[1] + 3.0 * (logits[0] - logits[1]))
    s = SamplingSettings(cfg=1.0)
    assert s.batch == 1 and torch.equal(guided_logits(logits[:1], s), logits[0])
    assert SamplingSettings(cfg=0.0).batch == 2
    torch.testing.assert_close(guided_logits(logits, SamplingSettings(cfg=0.0)), logits[1])


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 100)
    kept = torch.isfinite(filter_logits(logits, 10, 0.0))
    assert (kept.sum(-1) == 10).all()
    assert torch.equal(kept, logits >= torch.topk(logits, 10).values[:, -1:])


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 0, 0.85))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, 0, 0.4))
    assert kept.tolist() == [[True, False, False, False]]


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingSettings(greedy=True), None), logits.argmax(-1))


def test_seeded_sampling_is_deterministic_and_respects_top_k():
    logits = torch.randn(4, 2048)
    s = SamplingSettings(top_k=5, seed=7)
    a = torch.stack([sample(logits, s, g) for g in [make_generator(7)] for _ in range(50)])
    b = torch.stack([sample(logits, s, g) for g in [make_generator(7)] for _ in range(50)])
    assert torch.equal(a, b)
    top5 = torch.topk(logits, 5).indices
    assert all((a[:, k, None] == top5[k]).any(-1).all() for k in range(4))


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(1, 1)
    cold = SamplingSettings(temperature=0.05, top_k=0)
    g = make_generator(0)
    draws = torch.stack([sample(logits, cold, g) for _ in range(200)])
    assert (draws == 0).all()


@pytest.mark.parametrize("kwargs", [dict(cfg=-1.0), dict(cfg=float("nan")), dict(temperature=0.0),
                                    dict(top_k=-1), dict(top_p=1.5)])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingSettings(**kwargs)
