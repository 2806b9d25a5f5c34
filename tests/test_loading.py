"""Loading: presets, transformers directories, the offline Hugging Face cache, and
the one-line errors for everything a user can get wrong."""

import json

import pytest
import torch

from musicsteer.errors import ModelLoadError
from musicsteer.model.config import PRESETS
from musicsteer.model.loading.load import load_model


def test_preset_shapes_are_the_real_ones():
    assert (PRESETS["small"].hidden, PRESETS["small"].layers, PRESETS["small"].heads, PRESETS["small"].ffn) == \
        (1024, 24, 16, 4096)
    assert (PRESETS["medium"].hidden, PRESETS["medium"].layers, PRESETS["medium"].heads) == (1536, 48, 24)
    assert (PRESETS["large"].hidden, PRESETS["large"].layers, PRESETS["large"].heads, PRESETS["large"].ffn) == \
        (2048, 48, 32, 8192)
    for cfg in PRESETS.values():
        assert cfg.codebooks == 4 and cfg.vocab == 2048


def test_tiny_preset_is_deterministic(tiny):
    again = load_model("tiny")
    for (n, a), (_, b) in zip(tiny.decoder.state_dict().items(), again.decoder.state_dict().items()):
        assert torch.equal(a, b), n
    assert tiny.codec.sample_rate == 32000 and tiny.codec.hop == 640


def test_transformers_directory_loads_every_decoder_weight(musicgen_dirs):
    directory, hf, _ = musicgen_dirs["a"]
    loaded = load_model(str(directory))
    assert loaded.format == "transformers"
    d = hf.decoder.model.decoder
    torch.testing.assert_close(loaded.decoder.embed.weight[: 2049], d.embed_tokens[0].weight)
    torch.testing.assert_close(loaded.decoder.heads.weight[2048:4096], hf.decoder.lm_heads[1].weight)
    torch.testing.assert_close(loaded.decoder.blocks[2].self_attn.wqkv.weight[48:], torch.cat(
        [d.layers[2].self_attn.k_proj.weight, d.layers[2].self_attn.v_proj.weight]))
    torch.testing.assert_close(loaded.decoder.text_proj.bias, hf.enc_to_dec_proj.bias)


def test_repo_id_resolves_from_the_local_cache_only(musicgen_dirs, tmp_path, monkeypatch):
    from builders import place_in_hf_cache
    from huggingface_hub import constants

    directory, _, _ = musicgen_dirs["b"]
    place_in_hf_cache(tmp_path / "hub", "acme/musicgen-test", directory)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("acme/musicgen-test")
    assert loaded.cfg.hidden == 64 and loaded.cfg.layers == 2
    with pytest.raises(ModelLoadError, match=r"unknown model 'acme/other'.*Hugging Face cache"):
        load_model("acme/other")


@pytest.mark.parametrize("spec, message", [
    ("huge", r"unknown model 'huge': not demo or a preset \(tiny, small, medium, large\)"),
    ("/no/such/dir", r"no such directory"),
])
def test_unknown_names(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_directory_in_neither_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a transformers MusicGen .* nor an audiocraft checkpoint"):
        load_model(str(tmp_path))


def test_a_file_is_not_a_model(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f))


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*config.json"):
        load_model(str(tmp_path))


def test_config_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="describes a 'bert' model, not MusicGen"):
        load_model(str(tmp_path))


def test_missing_weights(musicgen_dirs, tmp_path):
    directory, _, _ = musicgen_dirs["a"]
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))


def test_corrupt_weights(musicgen_dirs, tmp_path):
    directory, _, _ = musicgen_dirs["a"]
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 5000])  # truncated download
    with pytest.raises(ModelLoadError, match=f"cannot load {tmp_path}"):
        load_model(str(tmp_path))


def test_missing_tokenizer(musicgen_dirs, tmp_path):
    directory, _, _ = musicgen_dirs["a"]
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (directory / name).exists():
            (tmp_path / name).write_bytes((directory / name).read_bytes())
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_model(str(tmp_path))
