"""The lean decoder against audiocraft's own LMModel, through the committed fixture
(tools/audiocraft_fixture regenerates it), and the offline resolution of the T5 and
codec an audiocraft checkpoint names."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from musicsteer.cli import main
from musicsteer.errors import ModelLoadError
from musicsteer.kernels import cpu
from musicsteer.model.generate import generate
from musicsteer.model.loading.load import encodec_32khz_config, load_model
from musicsteer.model.sampling import SamplingSettings

FIXTURE = Path(__file__).parent / "fixtures" / "audiocraft_tiny"
META = json.loads((FIXTURE / "meta.json").read_text())
EXPECTED = np.load(FIXTURE / "expected.npz")


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    """A random EnCodec in the 32 kHz layout, standing in for facebook/encodec_32khz."""
    from transformers import EncodecConfig, EncodecModel

    d = tmp_path_factory.mktemp("encodec")
    torch.manual_seed(0)
    EncodecModel(encodec_32khz_config(EncodecConfig, tiny=True)).save_pretrained(d)
    return d


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_fixture_is_what_the_test_expects():
    assert META["cfg_coef"] == 3.0 and META["use_sampling"] is False
    assert EXPECTED["codes"].shape == (4, META["max_gen_len"]) and META["max_gen_len"] >= 100
    assert EXPECTED["logits"].shape == (META["num_steps"], 4, META["card"])


def test_render_greedy_matches_audiocraft_tokens(codec_dir, tmp_path):
    frames = EXPECTED["codes"].shape[1]
    tokens = tmp_path / "tokens.npy"
    rc = main(["render", "--model", str(FIXTURE), "--text-encoder", str(FIXTURE / "t5"), "--codec", str(codec_dir),
               "--prompt", META["prompt"], "--duration", str(frames / 50), "--greedy", "--cfg", "3.0",
               "--out", str(tmp_path / "out.wav"), "--save-tokens", str(tokens), "--no-progress"])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tokens), EXPECTED["codes"])


def test_step_logits_match_audiocraft(codec_dir):
    loaded = load_model(str(FIXTURE), text_encoder=str(FIXTURE / "t5"), codec=str(codec_dir))
    assert loaded.format == "audiocraft" and loaded.cfg.vocab == META["card"]
    # the CPU fast path (blocks as C calls) is what these tokens and logits check, wherever it builds
    assert (loaded.decoder.fused_stack is not None) == (cpu.library() is not None)
    result = generate(loaded.decoder, loaded.text, META["prompt"], EXPECTED["codes"].shape[1],
                      SamplingSettings(cfg=3.0, greedy=True), record_logits=True)
    np.testing.assert_array_equal(result.sequence.numpy(), EXPECTED["sequence"])
    np.testing.assert_allclose(result.logits.numpy(), EXPECTED["logits"], atol=1e-4, rtol=0)


def test_t5_and_codec_resolve_from_the_hf_cache(hf_cache, codec_dir):
    from builders import place_in_hf_cache

    place_in_hf_cache(hf_cache, "t5-base", FIXTURE / "t5")
    place_in_hf_cache(hf_cache, "facebook/encodec_32khz", codec_dir)
    loaded = load_model(str(FIXTURE))
    assert "t5-base" in loaded.text.source and "encodec_32khz" in loaded.codec.source


def test_t5_under_its_current_hub_name_is_found(hf_cache, codec_dir):
    from builders import place_in_hf_cache

    place_in_hf_cache(hf_cache, "google-t5/t5-base", FIXTURE / "t5")
    loaded = load_model(str(FIXTURE), codec=str(codec_dir))
    assert "google-t5/t5-base" in loaded.text.source


def test_missing_text_encoder_says_where_it_looked(hf_cache, codec_dir):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(FIXTURE), codec=str(codec_dir))
    message = str(info.value)
    assert "text encoder 't5-base'" in message and "not available offline" in message
    assert "models--t5-base" in message and "models--google-t5--t5-base" in message
    assert str(hf_cache) in message and "--text-encoder DIR" in message


def test_missing_codec_says_where_it_looked(hf_cache):
    with pytest.raises(ModelLoadError, match=r"codec 'facebook/encodec_32khz' .* models--facebook--encodec_32khz"
                                             r" in the Hugging Face cache .*--codec DIR"):
        load_model(str(FIXTURE), text_encoder=str(FIXTURE / "t5"))


def test_text_encoder_override_must_be_a_t5_directory(tmp_path, codec_dir):
    with pytest.raises(ModelLoadError, match="--text-encoder .*no config.json"):
        load_model(str(FIXTURE), text_encoder=str(tmp_path), codec=str(codec_dir))


def test_corrupt_audiocraft_checkpoint(tmp_path):
    (tmp_path / "state_dict.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ModelLoadError, match="cannot read .*state_dict.bin"):
        load_model(str(tmp_path))


def test_audiocraft_checkpoint_missing_weights(tmp_path):
    package = torch.load(FIXTURE / "state_dict.bin", weights_only=True)
    del package["best_state"]["linears.3.weight"]
    torch.save(package, tmp_path / "state_dict.bin")
    with pytest.raises(ModelLoadError, match="missing LM weight 'linears.3.weight'"):
        load_model(str(tmp_path))


def test_console_reports_missing_text_encoder_in_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    rc = main(["render", "--model", str(FIXTURE), "--prompt", "x", "--duration", "1", "--out",
               str(tmp_path / "x.wav"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "text encoder 't5-base'" in err
