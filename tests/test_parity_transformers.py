"""The lean decoder against transformers' own MusicGen on random weights."""

import numpy as np
import pytest
import torch

from musicsteer.cli import main
from musicsteer.kernels import cpu
from musicsteer.model.generate import generate
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

PROMPT = "lofi hip hop with warm piano"
NEW_TOKENS = 104  # 101 frames: 100+ greedy steps


def reference(model, tok):
    """transformers' greedy CFG generation: codes (K, F) and processed scores (steps, K, V)."""
    inputs = tok([PROMPT], return_tensors="pt")
    captured = {}
    original = model.audio_encoder.decode

    def keep_codes(codes, *args, **kwargs):
        captured["codes"] = codes.clone()
        return original(codes, *args, **kwargs)

    model.audio_encoder.decode = keep_codes
    try:
        out = model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=NEW_TOKENS,
                             return_dict_in_generate=True, output_scores=True)
    finally:
        model.audio_encoder.decode = original
    return captured["codes"][0, 0], torch.stack(out.scores)


@pytest.mark.parametrize("shape", ["a", "b"])
def test_render_greedy_matches_transformers_tokens(shape, musicgen_dirs, tmp_path):
    directory, model, tok = musicgen_dirs[shape]
    ref_codes, _ = reference(model, tok)
    frames = ref_codes.shape[1]
    assert frames == NEW_TOKENS - 3
    tokens = tmp_path / "tokens.npy"
    rc = main(["render", "--model", str(directory), "--prompt", PROMPT, "--duration", str(frames / 50),
               "--greedy", "--cfg", "3.0", "--out", str(tmp_path / "out.wav"), "--save-tokens", str(tokens),
               "--no-progress"])
    assert rc == 0
    ours = np.load(tokens)
    assert ours.dtype == np.int64 and ours.shape == (4, frames)
    np.testing.assert_array_equal(ours, ref_codes.numpy())


@pytest.mark.parametrize("shape", ["a", "b"])
def test_step_logits_match_transformers(shape, musicgen_dirs):
    directory, model, tok = musicgen_dirs[shape]
    ref_codes, ref_scores = reference(model, tok)
    loaded = load_model(str(directory))
    # the CPU fast path (blocks as C calls) is what these tokens and logits check, wherever it builds
    assert (loaded.decoder.fused_stack is not None) == (cpu.library() is not None)
    result = generate(loaded.decoder, loaded.text, PROMPT, ref_codes.shape[1],
                      SamplingSettings(cfg=3.0, greedy=True), record_logits=True)
    assert torch.equal(result.codes, ref_codes)
    assert result.logits.shape == ref_scores.shape
    torch.testing.assert_close(result.logits, ref_scores.float(), atol=1e-4, rtol=0)
