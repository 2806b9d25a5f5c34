"""The delay pattern, against its definition and against transformers' own mask."""

import torch

from musicsteer.model.delay import deinterleave, interleave, steps_for, valid_mask

SPECIAL = 2048


def test_interleave_places_codebook_k_of_frame_f_at_position_f_plus_k_plus_1():
    codes = torch.arange(4 * 6).view(4, 6)
    seq = interleave(codes, SPECIAL)
    assert seq.shape == (4, 10)
    assert (seq[:, 0] == SPECIAL).all()
    for k in range(4):
        for f in range(6):
            assert seq[k, f + k + 1] == codes[k, f]
        assert (seq[k, 1 : 1 + k] == SPECIAL).all()
        assert (seq[k, 1 + k + 6 :] == SPECIAL).all()


def test_deinterleave_inverts_interleave_with_batch_dims():
    codes = torch.randint(0, 2048, (3, 4, 17))
    torch.testing.assert_close(deinterleave(interleave(codes, SPECIAL)), codes)


def test_valid_mask_follows_the_step_rule():
    assert valid_mask(0, 4, 5).tolist() == [True, False, False, False]
    assert valid_mask(3, 4, 5).tolist() == [True, True, True, True]
    assert valid_mask(5, 4, 5).tolist() == [False, True, True, True]
    assert valid_mask(7, 4, 5).tolist() == [False, False, False, True]
    assert valid_mask(100, 4, None).tolist() == [True] * 4
    assert steps_for(5, 4) == 8


def test_matches_transformers_delay_pattern():
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    lm = MusicgenForCausalLM(MusicgenDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   ffn_dim=16, vocab_size=2048))
    frames = 7
    max_length = 1 + steps_for(frames, 4)
    start = torch.full((4, 1), SPECIAL)
    _, pattern = lm.build_delay_pattern_mask(start, SPECIAL, max_length=max_length)  # -1 where a token goes
    codes = torch.randint(0, 2048, (4, frames))
    ours = interleave(codes, SPECIAL)
    assert torch.equal(ours != SPECIAL, pattern == -1)
    for s in range(max_length - 1):
        assert torch.equal(valid_mask(s, 4, frames), pattern[:, s + 1] == -1)
