"""Loading a model for `--model`: a preset with random weights, a transformers-format
directory, an audiocraft-format directory, or a Hugging Face repo id from the local
cache (never the network).

T5 and EnCodec come from transformers; the decoder's weights are moved into the
lean `MusicGen`. Every failure a user can cause raises `ModelLoadError` with one
line that says what was looked at and what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...backends.select import BackendError, prepare
from ...codec.codec import Codec
from ...errors import ModelLoadError
from ..config import PRESETS, ModelConfig
from ..musicgen import MusicGen
from ..text import ByteTokenizer, TextEncoder
from ...models import embedded_model
from .audiocraft import load_audiocraft_dir
from .common import (
    LoadedModel,
    first_line,
    hf_cache_dir,
    hf_cache_snapshot,
    load_codec_dir,
    load_text_encoder_dir,
    load_tokenizer,
)


def load_model(spec: str, *, text_encoder: str | None = None, codec: str | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               weights: str = "full", kv_cache: str = "auto") -> LoadedModel:
    """Resolve `spec` and load decoder, text encoder and codec; `weights="int8"` stores the
    decoder's linear weights as int8 and its self-attention caches as bfloat16 (CPU); `kv_cache`
    chooses the caches' storage (backends/select.KV_CACHES)."""
    loaded = load_unprepared(spec, text_encoder=text_encoder, codec=codec)
    try:
        loaded.backend = prepare(loaded.decoder, device, dtype, weights, kv_cache)  # the one backend choice
    except BackendError as exc:
        raise ModelLoadError(str(exc)) from None
    loaded.text.model.to(device)
    loaded.codec.model.to(device)
    return loaded


def load_unprepared(spec: str, *, text_encoder: str | None = None, codec: str | None = None) -> LoadedModel:
    """`load_model` before the backend: the float32 reference decoder on the CPU, as read (for
    comparisons that prepare copies of it in several ways, e.g. bench fidelity)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    if spec in PRESETS:
        loaded = load_preset(spec)
    else:
        path = resolve_path(spec)
        kind = detect_format(path)
        if kind == "transformers":
            loaded = load_transformers_dir(path, spec)
        else:
            loaded = load_audiocraft_dir(path, spec, text_encoder=text_encoder, codec=codec)
    if text_encoder is not None and loaded.format != "audiocraft":
        loaded.text = load_text_encoder_dir(Path(text_encoder), "--text-encoder")
    if codec is not None and loaded.format != "audiocraft":
        loaded.codec = load_codec_dir(Path(codec), "--codec")
    check_compatible(loaded)
    return loaded


def load_decoder(spec: str) -> MusicGen:
    """The float32 reference decoder `spec` names, before the backend; an audiocraft directory's
    without looking up its T5 or codec."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec not in PRESETS and detect_format(resolve_path(spec)) == "audiocraft":
        return load_audiocraft_dir(resolve_path(spec), spec, decoder_only=True)
    return load_unprepared(spec).decoder


def model_config(spec: str) -> ModelConfig:
    """The decoder shape `spec` names, without building T5 or the codec."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec in PRESETS:
        return PRESETS[spec]
    path = resolve_path(spec)
    if detect_format(path) == "transformers":
        from transformers import MusicgenConfig

        try:
            return config_from_transformers(MusicgenConfig.from_pretrained(path, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {path}/config.json: {first_line(exc)}") from exc
    return load_audiocraft_dir(path, spec, text_encoder=None, codec=None, decoder_only=True).cfg


def check_compatible(loaded: LoadedModel) -> None:
    cfg = loaded.cfg
    if loaded.text.hidden != cfg.text_hidden:
        raise ModelLoadError(
            f"text encoder {loaded.text.source} gives {loaded.text.hidden}-d states; "
            f"the decoder expects {cfg.text_hidden}-d")
    if loaded.codec.codebook_size < cfg.vocab:
        raise ModelLoadError(
            f"codec {loaded.codec.source} has {loaded.codec.codebook_size} entries per codebook; "
            f"the decoder emits {cfg.vocab}")


# -- resolving the name -----------------------------------------------------------

def resolve_path(spec: str) -> Path:
    """A shipped model's directory (`demo`), a directory, or a repo id's snapshot in the local
    Hugging Face cache."""
    shipped = embedded_model(spec)
    if shipped is not None:
        return shipped
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {spec!r} is a file; --model takes demo, a preset "
                                 f"({', '.join(PRESETS)}), a directory or a Hugging Face repo id")
        return path
    cached = hf_cache_snapshot(spec)
    if cached is not None:
        return cached
    raise ModelLoadError(
        f"unknown model {spec!r}: not demo or a preset ({', '.join(PRESETS)}), no such directory, "
        f"and no snapshot of that repo id in the Hugging Face cache ({hf_cache_dir()})")


def detect_format(path: Path) -> str:
    names = {p.name for p in path.iterdir()}
    if "config.json" in names:
        return "transformers"
    if "state_dict.bin" in names:
        return "audiocraft"
    raise ModelLoadError(
        f"{path} holds neither a transformers MusicGen (config.json + model.safetensors) "
        f"nor an audiocraft checkpoint (state_dict.bin + compression_state_dict.bin)")


# -- presets ---------------------------------------------------------------------

def load_preset(name: str, seed: int = 0) -> LoadedModel:
    """Random weights in the real shapes; the same seed gives the same model."""
    from transformers import EncodecConfig, EncodecModel, T5Config, T5EncoderModel

    cfg = PRESETS[name]
    tiny = name == "tiny"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tiny:
            t5_cfg = T5Config(d_model=cfg.text_hidden, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                              vocab_size=ByteTokenizer.vocab_size)
        else:  # T5-base shape
            t5_cfg = T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128)
        t5 = T5EncoderModel(t5_cfg).eval()
        codec = randomize_codebooks(EncodecModel(encodec_32khz_config(EncodecConfig, tiny=tiny)).eval())
        decoder = MusicGen.random(cfg, seed=seed)
    return LoadedModel(decoder, TextEncoder(t5, ByteTokenizer(), f"random T5 ({name} preset)"),
                       Codec(codec, f"random EnCodec 32 kHz ({name} preset)"), name, "preset")


@torch.no_grad()
def randomize_codebooks(codec):
    """Random codebooks for a random EnCodec: transformers starts them at zero (EnCodec fills
    them by k-means while training), which would map every input to code 0. Each residual
    level gets Gaussian entries at the scale of what it quantizes (measured on noise)."""
    probe = torch.randn(1, 1, 32000) * 0.3
    residual = codec.encoder(probe).transpose(1, 2).reshape(-1, codec.config.codebook_dim)  # (frames, dim)
    for layer in codec.quantizer.layers:
        book = layer.codebook
        entries = torch.randn(book.embed.shape) * residual.std(0, keepdim=True) + residual.mean(0, keepdim=True)
        book.embed.copy_(entries)
        book.embed_avg.copy_(entries)
        residual = residual - entries[torch.cdist(residual, entries).argmin(-1)]
    return codec


def encodec_32khz_config(config_cls, tiny: bool = False):
    """The 32 kHz EnCodec layout of MusicGen (hop 640, 4 codebooks of 2048); `tiny` narrows it."""
    width = dict(hidden_size=32, num_filters=4, num_lstm_layers=1) if tiny else \
        dict(hidden_size=128, num_filters=64, num_lstm_layers=2)
    return config_cls(
        sampling_rate=32000, audio_channels=1, normalize=False, chunk_length_s=None, overlap=None,
        upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect",
        compress=2, num_residual_layers=1, codebook_size=2048, target_bandwidths=[2.2],
        use_conv_shortcut=False, **width)


# -- transformers format --------------------------------------------------------------

def load_transformers_dir(path: Path, spec: str) -> LoadedModel:
    config = _read_json(path / "config.json")
    if config.get("model_type") != "musicgen":
        raise ModelLoadError(f"{path}/config.json describes a {config.get('model_type')!r} model, not MusicGen")
    weights = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
               if (path / n).exists()]
    if not weights:
        raise ModelLoadError(f"{path} has config.json but no weights (model.safetensors)")
    dec = config.get("decoder", {})
    if dec.get("audio_channels", 1) != 1:
        raise ModelLoadError(f"{path} is a stereo MusicGen; only mono models are supported")
    from transformers import MusicgenForConditionalGeneration
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = MusicgenForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # corrupt or truncated files: say which, in one line
        raise ModelLoadError(f"cannot load {path}: {first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    decoder = decoder_from_transformers(hf)
    text = TextEncoder(hf.text_encoder.eval(), load_tokenizer(path), str(path))
    codec = Codec(hf.audio_encoder.eval(), str(path))
    return LoadedModel(decoder, text, codec, spec, "transformers")


def config_from_transformers(hf_config) -> ModelConfig:
    d = hf_config.decoder
    if getattr(d, "scale_embedding", False):
        raise ModelLoadError("decoder config has scale_embedding=true, which MusicGen checkpoints never use")
    proj = hf_config.text_encoder.hidden_size != d.hidden_size and d.cross_attention_hidden_size is None
    return ModelConfig(
        hidden=d.hidden_size, layers=d.num_hidden_layers, heads=d.num_attention_heads, ffn=d.ffn_dim,
        vocab=d.vocab_size, codebooks=d.num_codebooks,
        text_hidden=hf_config.text_encoder.hidden_size if proj else d.hidden_size,
        max_positions=d.max_position_embeddings, activation=_activation_name(d.activation_function),
        name="transformers")


def decoder_from_transformers(hf) -> MusicGen:
    """Move the weights of a `MusicgenForConditionalGeneration` into the lean decoder."""
    cfg = config_from_transformers(hf.config)
    dec = hf.decoder.model.decoder
    sd: dict[str, torch.Tensor] = {
        "embed.weight": torch.cat([e.weight for e in dec.embed_tokens]),
        "norm.weight": dec.layer_norm.weight, "norm.bias": dec.layer_norm.bias,
        "heads.weight": torch.cat([h.weight for h in hf.decoder.lm_heads]),
    }
    if getattr(hf, "enc_to_dec_proj", None) is not None:
        sd["text_proj.weight"], sd["text_proj.bias"] = hf.enc_to_dec_proj.weight, hf.enc_to_dec_proj.bias
    for i, layer in enumerate(dec.layers):
        sa, ca = layer.self_attn, layer.encoder_attn
        p = f"blocks.{i}."
        sd |= {
            p + "self_attn.wqkv.weight": torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]),
            p + "self_attn.wo.weight": sa.out_proj.weight,
            p + "cross_attn.wq.weight": ca.q_proj.weight,
            p + "cross_attn.wkv.weight": torch.cat([ca.k_proj.weight, ca.v_proj.weight]),
            p + "cross_attn.wo.weight": ca.out_proj.weight,
            p + "fc1.weight": layer.fc1.weight, p + "fc2.weight": layer.fc2.weight,
        }
        for mine, theirs in (("norm_self", layer.self_attn_layer_norm), ("norm_cross", layer.encoder_attn_layer_norm),
                             ("norm_mlp", layer.final_layer_norm)):
            sd[p + mine + ".weight"], sd[p + mine + ".bias"] = theirs.weight, theirs.bias
    sd = {k: v.detach() for k, v in sd.items()}
    return MusicGen.from_state_dict(cfg, sd, position_style="transformers")


def _activation_name(name: str) -> str:
    return {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}.get(name, name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {first_line(exc)}") from exc
