"""Loading an audiocraft-format MusicGen directory: `state_dict.bin` (the exported LM:
`xp.cfg` as YAML text and `best_state`) and `compression_state_dict.bin` (the codec,
for MusicGen a pointer to the pretrained `facebook/encodec_32khz`).

The T5 encoder named in `xp.cfg` and the codec are resolved from the local Hugging
Face cache, offline; `--text-encoder` and `--codec` override them. audiocraft itself
is never imported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ModelLoadError
from ..config import FRAME_RATE, ModelConfig
from ..musicgen import MusicGen
from .common import (
    LoadedModel,
    first_line,
    hf_cache_dir,
    hf_cache_snapshot,
    load_codec_dir,
    load_text_encoder_dir,
)

# Settings of the real MusicGen LMs that the lean decoder implements; anything else is refused.
EXPECTED = {
    "positional_embedding": "sin", "norm": "layer_norm", "norm_first": True, "bias_ff": False,
    "bias_attn": False, "bias_proj": False, "layer_scale": None, "qk_layer_norm": False,
    "qk_layer_norm_cross": False, "kv_repeat": 1, "xpos": False, "causal": True,
}


def load_audiocraft_dir(path: Path, spec: str, *, text_encoder: str | None = None,
                        codec: str | None = None, decoder_only: bool = False) -> LoadedModel | MusicGen:
    """The model in `path`; with `decoder_only`, just the decoder (no T5 or codec lookup)."""
    package = _torch_load(path / "state_dict.bin")
    if not isinstance(package, dict) or "best_state" not in package or "xp.cfg" not in package:
        raise ModelLoadError(f"{path}/state_dict.bin is not an exported audiocraft LM (no 'xp.cfg'/'best_state')")
    xp = _parse_cfg(package["xp.cfg"], path)
    cfg, position_scale = config_from_xp(xp, path)
    state = package["best_state"]
    if "model" in state and isinstance(state["model"], dict):  # solver checkpoints nest the LM
        state = state["model"]
    decoder = decoder_from_audiocraft(cfg, state, position_scale, path)
    if decoder_only:
        return decoder

    t5_name = _get(xp, "conditioners.description.t5.name")
    if text_encoder is not None:
        text = load_text_encoder_dir(Path(text_encoder), "--text-encoder")
    else:
        text = _cached_text_encoder(t5_name, path)
    if codec is not None:
        codec_model = load_codec_dir(Path(codec), "--codec")
    else:
        codec_model = _cached_codec(path)
    return LoadedModel(decoder, text, codec_model, spec, "audiocraft")


def config_from_xp(xp: dict, path: Path) -> tuple[ModelConfig, float]:
    lm = xp.get("transformer_lm")
    if not isinstance(lm, dict):
        raise ModelLoadError(f"{path}/state_dict.bin: xp.cfg has no transformer_lm section")
    for key, want in EXPECTED.items():
        if key in lm and lm[key] != want:
            raise ModelLoadError(f"{path}: transformer_lm.{key}={lm[key]!r} is not supported (MusicGen uses {want!r})")
    fuser = xp.get("fuser", {}) or {}
    if fuser.get("cross_attention_pos_emb"):
        raise ModelLoadError(f"{path}: fuser.cross_attention_pos_emb=true is not supported")
    if "description" not in (fuser.get("cross") or []) or (fuser.get("prepend") or fuser.get("sum")):
        raise ModelLoadError(f"{path}: only text conditioning by cross-attention is supported (fuser: {fuser})")
    delays = _get(xp, "codebooks_pattern.delay.delays")
    n_q = int(lm.get("n_q", 4))
    if _get(xp, "codebooks_pattern.modeling") != "delay" or list(delays) != list(range(n_q)):
        raise ModelLoadError(f"{path}: only the delay pattern with delays 0..{n_q - 1} is supported")
    if _get(xp, "conditioners.description.model") != "t5":
        raise ModelLoadError(f"{path}: only a T5 text conditioner is supported")
    if float(lm.get("max_period", 10000)) != 10000:
        raise ModelLoadError(f"{path}: transformer_lm.max_period={lm['max_period']} is not supported")
    dim = int(lm["dim"])
    segment = xp.get("dataset", {}).get("segment_duration")
    max_positions = max(2048, int(float(segment) * FRAME_RATE) + n_q + 1) if isinstance(segment, (int, float)) \
        else 2048
    cfg = ModelConfig(
        hidden=dim, layers=int(lm["num_layers"]), heads=int(lm["num_heads"]),
        ffn=int(dim * float(lm.get("hidden_scale", 4))), vocab=int(lm["card"]), codebooks=n_q,
        text_hidden=0, max_positions=max_positions, activation=lm.get("activation", "gelu"), name="audiocraft")
    return cfg, float(lm.get("positional_scale", 1.0))


def decoder_from_audiocraft(cfg: ModelConfig, state: dict, position_scale: float, path: Path) -> MusicGen:
    """Map an audiocraft LM state dict onto the lean decoder."""
    D = cfg.hidden
    try:
        proj_w = state["condition_provider.conditioners.description.output_proj.weight"]
        cfg = cfg.with_(text_hidden=proj_w.shape[1])
        sd = {
            "embed.weight": torch.cat([state[f"emb.{k}.weight"] for k in range(cfg.codebooks)]),
            "heads.weight": torch.cat([state[f"linears.{k}.weight"] for k in range(cfg.codebooks)]),
            "norm.weight": state["out_norm.weight"], "norm.bias": state["out_norm.bias"],
            "text_proj.weight": proj_w,
            "text_proj.bias": state["condition_provider.conditioners.description.output_proj.bias"],
        }
        for i in range(cfg.layers):
            a, p = f"transformer.layers.{i}.", f"blocks.{i}."
            cross = state[a + "cross_attention.in_proj_weight"]  # (3D, D): q, k, v
            sd |= {
                p + "self_attn.wqkv.weight": state[a + "self_attn.in_proj_weight"],
                p + "self_attn.wo.weight": state[a + "self_attn.out_proj.weight"],
                p + "cross_attn.wq.weight": cross[:D],
                p + "cross_attn.wkv.weight": cross[D:],
                p + "cross_attn.wo.weight": state[a + "cross_attention.out_proj.weight"],
                p + "fc1.weight": state[a + "linear1.weight"], p + "fc2.weight": state[a + "linear2.weight"],
            }
            for mine, theirs in (("norm_self", "norm1"), ("norm_cross", "norm_cross"), ("norm_mlp", "norm2")):
                sd[p + mine + ".weight"] = state[a + theirs + ".weight"]
                sd[p + mine + ".bias"] = state[a + theirs + ".bias"]
    except KeyError as exc:
        raise ModelLoadError(f"{path}/state_dict.bin: missing LM weight {exc.args[0]!r}") from exc
    sd = {k: v.detach().float().contiguous() for k, v in sd.items()}
    try:
        model = MusicGen.from_state_dict(cfg, sd, position_style="audiocraft")
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}/state_dict.bin: weights do not fit xp.cfg ({first_line(exc)})") from exc
    if position_scale != 1.0:
        model.positions.mul_(position_scale)
    return model


# -- what the checkpoint names: T5 and EnCodec from the local cache -------------------

def _hub_names(name: str) -> list[str]:
    """The names a T5 may be cached under: audiocraft's short name and its current hub id."""
    names = [name]
    if "/" not in name:
        names.append(f"google-t5/{name}")
    return names


def _cached_text_encoder(name: str | None, path: Path):
    if not name:
        raise ModelLoadError(f"{path}: xp.cfg names no T5 model (conditioners.description.t5.name); "
                             f"pass --text-encoder DIR")
    for repo in _hub_names(name):
        snapshot = hf_cache_snapshot(repo)
        if snapshot is not None:
            text = load_text_encoder_dir(snapshot, f"text encoder {repo!r}")
            text.source = f"{repo} (Hugging Face cache)"
            return text
    looked = " and ".join("models--" + r.replace("/", "--") for r in _hub_names(name))
    raise ModelLoadError(
        f"text encoder {name!r} (named in {path}/state_dict.bin) is not available offline: looked for {looked} "
        f"in the Hugging Face cache {hf_cache_dir()}; copy that model into the cache, or pass --text-encoder DIR "
        f"(a T5 directory with its tokenizer)")


def _cached_codec(path: Path):
    file = path / "compression_state_dict.bin"
    if not file.exists():
        raise ModelLoadError(f"{path} has no compression_state_dict.bin; pass --codec DIR (an EnCodec directory)")
    package = _torch_load(file)
    pretrained = package.get("pretrained") if isinstance(package, dict) else None
    if not isinstance(pretrained, str):
        raise ModelLoadError(f"{file} holds an audiocraft-trained codec, which is not supported; "
                             f"pass --codec DIR (a transformers EnCodec directory)")
    repo = pretrained.removeprefix("//pretrained/")
    snapshot = hf_cache_snapshot(repo)
    if snapshot is None:
        raise ModelLoadError(
            f"codec {repo!r} (named in {file}) is not available offline: looked for "
            f"models--{repo.replace('/', '--')} in the Hugging Face cache {hf_cache_dir()}; copy it there, "
            f"or pass --codec DIR")
    codec = load_codec_dir(snapshot, f"codec {repo!r}")
    codec.source = f"{repo} (Hugging Face cache)"
    return codec


# -- reading ---------------------------------------------------------------------------

def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {file}: {first_line(exc)}") from exc


def _parse_cfg(text, path: Path) -> dict:
    import yaml

    if isinstance(text, dict):
        return text
    try:
        xp = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path}/state_dict.bin: xp.cfg is not valid YAML ({first_line(exc)})") from exc
    if not isinstance(xp, dict):
        raise ModelLoadError(f"{path}/state_dict.bin: xp.cfg is not a mapping")
    return xp


def _get(xp: dict, dotted: str):
    node = xp
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
