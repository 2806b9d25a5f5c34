"""What the loaders of every format share: the loaded model's parts, the Hugging Face cache
looked up offline, T5 and EnCodec directories, and the one line an exception shows.

It knows no checkpoint format; load.py and audiocraft.py build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...backends.select import Backend
from ...codec.codec import Codec
from ...errors import ModelLoadError
from ..config import ModelConfig
from ..musicgen import MusicGen
from ..text import TextEncoder


@dataclass
class LoadedModel:
    decoder: MusicGen
    text: TextEncoder
    codec: Codec
    model_id: str  # what the user named: preset, directory or repo id
    format: str  # "preset" | "transformers" | "audiocraft"
    backend: Backend | None = None  # what load_model chose for the decoder (backends/select.py)

    @property
    def cfg(self) -> ModelConfig:
        return self.decoder.cfg


# -- the Hugging Face cache, offline ---------------------------------------------------

def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of `repo_id`, looked up offline; None if absent."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")) or not repo_id.strip():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None


# -- T5 and EnCodec directories ------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    # Without vocabulary files transformers builds an empty tokenizer silently; refuse instead.
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"no usable tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); "
                             f"save one there with the tokenizer's save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"no usable tokenizer in {path} ({first_line(exc)}); "
                             f"save one there with the tokenizer's save_pretrained") from exc


def load_text_encoder_dir(path: Path, what: str) -> TextEncoder:
    """A T5 encoder directory (config.json, weights, tokenizer files)."""
    from transformers import T5EncoderModel

    if not (path / "config.json").exists():
        raise ModelLoadError(f"{what} {path}: no config.json there; give a T5 directory written by save_pretrained")
    try:
        model = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{what} {path}: cannot load a T5 encoder ({first_line(exc)})") from exc
    return TextEncoder(model.eval(), load_tokenizer(path), str(path))


def load_codec_dir(path: Path, what: str) -> Codec:
    from transformers import EncodecModel

    try:
        model = EncodecModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{what} {path}: cannot load an EnCodec model ({first_line(exc)})") from exc
    return Codec(model.eval(), str(path))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
