"""Builders for test material: a tiny T5 tokenizer trained with sentencepiece, random
MusicGen models in the transformers format, and Hugging Face cache layouts.

Everything is written into directories the tests own; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

CORPUS = [
    "lofi hip hop with warm piano and soft drums",
    "an upbeat pop song with bright synths and claps",
    "slow ambient pads with a deep bass drone",
    "a jazz trio with brushed drums walking bass and piano",
    "heavy rock guitars with loud drums and a driving beat",
    "classical strings playing a gentle waltz in three",
    "techno with a four on the floor kick and acid bass",
    "acoustic folk guitar with whistling and hand claps",
]


def train_tokenizer(directory: Path, vocab_size: int = 96):
    """A T5 tokenizer (sentencepiece unigram) saved in `directory`; returns it."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    prefix = directory / "spiece"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2, hard_vocab_limit=False)
    corpus.unlink()
    (directory / "spiece.vocab").unlink()
    tok = T5Tokenizer(vocab_file=str(prefix) + ".model", extra_ids=0, legacy=False)
    tok.save_pretrained(directory)
    return tok


def musicgen_config(hidden: int, layers: int, heads: int, ffn: int, text_hidden: int, vocab_size: int,
                    max_positions: int = 256):
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        T5Config,
    )

    from musicsteer.model.loading.load import encodec_32khz_config

    text = T5Config(d_model=text_hidden, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=vocab_size)
    audio = encodec_32khz_config(EncodecConfig, tiny=True)
    decoder = MusicgenDecoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    ffn_dim=ffn, vocab_size=2048, max_position_embeddings=max_positions)
    return MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)


def save_random_musicgen(directory: Path, seed: int = 0, **shape):
    """A random `MusicgenForConditionalGeneration`, saved with save_pretrained plus its tokenizer."""
    from transformers import MusicgenForConditionalGeneration

    tok = train_tokenizer(directory)
    config = musicgen_config(vocab_size=len(tok), **shape)
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    perturb_norms(model, seed)
    model.save_pretrained(directory)
    return model, tok


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Give LayerNorms and biases non-trivial values so parity exercises them."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder.") and ("norm" in name or name.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def place_in_hf_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source`'s files as a cached snapshot of `repo_id` under the hub cache `cache`."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            (snapshot / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
