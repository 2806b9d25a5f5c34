"""Train the demo model's MusicGen: a small transformers `MusicgenForConditionalGeneration`
(the real architecture: delay pattern, sinusoidal positions, cross-attention to a T5
encoder, CFG dropout of the condition) on the demo codec's codes of the project's
FluidSynth clips, prompted by the instrument's name only (never the note or chord), so
every concept must be read from the music itself.

    python tools/demo_model/train_decoder.py --codec DIR         # train (or resume) runs/decoder
    python tools/demo_model/train_decoder.py --stop-after 200    # 200 more steps, then checkpoint
    python tools/demo_model/train_decoder.py --export DIR        # the whole model, transformers format

The T5 encoder is small, seeded and frozen (as MusicGen freezes its T5); its tokenizer is a
word-level one over the prompts' words, built here and saved with the model (tokenizer.json),
so `--model DIR` loads it through transformers like any MusicGen directory. The codec is
the demo codec (train_codec.py), stored inside the export as the model's audio encoder.

Resumable and deterministic: the run folder holds recipe.json, codes.pt (the dataset's
codes, computed once), ckpt.pt (decoder, optimizer, step) and log.jsonl. Every batch, crop
and condition drop is drawn from generators seeded by (seed, step), and torch runs on a
fixed number of threads (the recipe's), so a run from a seed, interrupted and resumed or
not, gives the same weights byte for byte on the same torch build.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import codec_data  # noqa: E402
import recipe_args  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_RUN = HERE / "runs" / "decoder"
HELD_OUT_SHARE = 0.1

# General MIDI names of codec_data.PROGRAMS, lower case: the only thing a prompt says.
INSTRUMENTS = {
    0: "acoustic grand piano", 4: "electric piano", 11: "vibraphone", 19: "church organ",
    24: "nylon string guitar", 26: "jazz electric guitar", 32: "acoustic bass", 40: "violin",
    42: "cello", 48: "string ensemble", 56: "trumpet", 60: "french horn", 65: "alto sax",
    71: "clarinet", 73: "flute", 80: "square lead synth",
}
# The prompt's forms; a clip's is drawn per step, so the model hears each name in each.
TEMPLATES = ("{}", "{} solo", "a {} playing", "solo {} music")
SPECIAL_WORDS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 1
    # decoder (MusicGen's layout, narrowed)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 512
    # T5 encoder (frozen, seeded)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    # data: the probe families the model learns to play
    families: tuple[str, ...] = ("notes", "intervals", "chords")
    programs: tuple[int, ...] = codec_data.PROGRAMS
    per_label: int = 7
    batch: int = 16
    frames: int = 150  # crop length: 3 s
    # schedule
    steps: int = 3500
    lr: float = 3e-3
    lr_final: float = 1e-4
    warmup: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cond_dropout: float = 0.2  # share of rows trained unconditionally (CFG)
    # bookkeeping
    log_every: int = 25
    ckpt_every: int = 100
    val_every: int = 250
    val_batches: int = 8

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        return Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_overrides(self, pairs: list[str]) -> Recipe:
        return recipe_args.with_overrides(self, pairs)


# -- text: the tokenizer and the frozen T5 --------------------------------------------------

def prompt_words() -> list[str]:
    words = sorted({w for name in INSTRUMENTS.values() for t in TEMPLATES for w in t.format(name).split()})
    return list(SPECIAL_WORDS) + words


def build_tokenizer():
    """A word-level tokenizer over the prompts' words (lower-cased, split on spaces and
    punctuation, unknown words -> <unk>, </s> appended as T5 does), as a transformers fast
    tokenizer that `save_pretrained` writes and `AutoTokenizer` reads back."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(prompt_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


def t5_config(r: Recipe):
    from transformers import T5Config

    return T5Config(vocab_size=len(prompt_words()), d_model=r.text_hidden, d_kv=r.text_hidden // r.text_heads,
                    d_ff=r.text_ff, num_layers=r.text_layers, num_heads=r.text_heads, dropout_rate=0.0,
                    feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_model(r: Recipe, codec_dir: Path):
    """The whole MusicGen: T5 (seeded, frozen), the demo codec's weights, a seeded decoder."""
    from transformers import (EncodecModel, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5EncoderModel)

    codec = EncodecModel.from_pretrained(codec_dir, local_files_only=True, dtype=torch.float32)
    dec = MusicgenDecoderConfig(
        vocab_size=codec.config.codebook_size, max_position_embeddings=2048, num_hidden_layers=r.layers,
        ffn_dim=r.ffn, num_attention_heads=r.heads, hidden_size=r.hidden, num_codebooks=len(codec.quantizer.layers),
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=codec.config.codebook_size, bos_token_id=codec.config.codebook_size,
        decoder_start_token_id=codec.config.codebook_size, audio_channels=1, tie_word_embeddings=False)
    config = MusicgenConfig(text_encoder=t5_config(r).to_dict(), audio_encoder=codec.config.to_dict(),
                            decoder=dec.to_dict())
    torch.manual_seed(r.seed)
    text = T5EncoderModel(t5_config(r))
    model = MusicgenForConditionalGeneration(config=config)
    model.text_encoder.load_state_dict(text.state_dict())
    model.audio_encoder.load_state_dict(codec.state_dict())
    gen = torch.Generator().manual_seed(r.seed + 1)
    with torch.no_grad():  # MusicGen's init (normal, std 0.02), from the recipe's seed, for every decoder weight
        for name, p in sorted(model.decoder.named_parameters()) + sorted(model.enc_to_dec_proj.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.generation_config.pad_token_id = dec.pad_token_id
    model.generation_config.decoder_start_token_id = dec.decoder_start_token_id
    model.text_encoder.requires_grad_(False)
    model.audio_encoder.requires_grad_(False)
    return model


def trained(model) -> list[torch.nn.Parameter]:
    return list(model.decoder.parameters()) + list(model.enc_to_dec_proj.parameters())


# -- data: codes of the probe clips ---------------------------------------------------------

@dataclass
class Codes:
    codes: torch.Tensor  # (clips, K, F) int16
    programs: torch.Tensor  # (clips,) GM program
    rows: list  # [family, label, clip] per clip
    vocab: int  # entries per codebook; `vocab` itself is the special token

    def subset(self, keep: list[int]) -> Codes:
        return Codes(self.codes[keep], self.programs[keep], [self.rows[i] for i in keep], self.vocab)


def codes_of(data_dir: Path, codec_dir: Path, out: Path, r: Recipe) -> Codes:
    """Every clip of the recipe's families through the codec's encoder (one thread: the same
    codes in every process), cached in the run folder and keyed by the codec's weights."""
    from musicsteer.model.loading.common import load_codec_dir
    from musicsteer.probes.dataset import build_dataset, load_manifest

    build_dataset(data_dir, families=list(r.families), programs=list(r.programs), per_label=r.per_label,
                  seed=r.seed, sample_rate=32000, workers=int(os.environ.get("DATASET_WORKERS", "2")),
                  progress=False)
    key = hashlib.sha256((codec_dir / "model.safetensors").read_bytes()).hexdigest()
    if out.exists():
        saved = torch.load(out, weights_only=False)
        if saved["codec_sha256"] == key:
            return Codes(saved["codes"], saved["programs"], saved["rows"], saved["vocab"])
    import soundfile as sf

    codec = load_codec_dir(codec_dir, "--codec")
    rows = sorted((row for row in load_manifest(data_dir) if row.family in r.families), key=lambda row: row.clip)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = [codec.encode(sf.read(row.path, dtype="float32")[0], len(codec.model.quantizer.layers))
                 for row in rows]
    finally:
        torch.set_num_threads(threads)
    result = Codes(torch.stack(codes).to(torch.int16), torch.tensor([row.program for row in rows]),
                   [[row.family, row.label, row.clip] for row in rows], codec.codebook_size)
    tmp = out.with_suffix(".partial")
    torch.save({"codec_sha256": key, "codes": result.codes, "programs": result.programs, "rows": result.rows,
                "vocab": result.vocab}, tmp)
    os.replace(tmp, out)
    return result


def split(codes: Codes) -> tuple[Codes, Codes]:
    """(training, held-out): the held-out tenth has the lowest crc32 of its clip path."""
    order = sorted(range(len(codes.rows)), key=lambda i: zlib.crc32(codes.rows[i][2].encode()))
    held = set(order[:max(1, round(HELD_OUT_SHARE * len(order)))])
    return (codes.subset([i for i in range(len(order)) if i not in held]),
            codes.subset([i for i in range(len(order)) if i in held]))


class Conditions:
    """T5 states of every (program, template) prompt, computed once (T5 is frozen)."""

    def __init__(self, model, tokenizer) -> None:
        self.keys = [(p, t) for p in sorted(INSTRUMENTS) for t in range(len(TEMPLATES))]
        prompts = [TEMPLATES[t].format(INSTRUMENTS[p]) for p, t in self.keys]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            self.states = model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        self.mask = enc.attention_mask
        self.index = {k: i for i, k in enumerate(self.keys)}

    def rows(self, programs: torch.Tensor, templates: torch.Tensor, drop: torch.Tensor):
        idx = torch.tensor([self.index[(int(p), int(t))] for p, t in zip(programs, templates)])
        states, mask = self.states[idx].clone(), self.mask[idx].clone()
        states[drop], mask[drop] = 0.0, 0  # the unconditional row, as CFG builds it at inference
        return states, mask


def batch(codes: Codes, r: Recipe, step: int, stream: int = 0, size: int | None = None):
    """(input (B*K, T), target (B, K, T), programs, templates, dropped) for step `step`: random
    clips, random frame-aligned crops laid out in the delay pattern (delay.interleave)."""
    from musicsteer.model.delay import interleave

    size = size or r.batch
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + step * 7 + stream)
    n, K, total = codes.codes.shape
    idx = torch.randint(0, n, (size,), generator=g)
    start = torch.randint(0, total - r.frames + 1, (size,), generator=g)
    templates = torch.randint(0, len(TEMPLATES), (size,), generator=g)
    drop = torch.rand(size, generator=g) < r.cond_dropout
    crops = torch.stack([codes.codes[i, :, s:s + r.frames] for i, s in zip(idx.tolist(), start.tolist())]).long()
    seq = interleave(crops, codes.vocab)  # (B, K, F + K), position 0 special
    inp = seq[..., :-1]
    return inp.reshape(size * K, -1), seq[..., 1:], codes.programs[idx], templates, drop


def loss_of(model, cond: Conditions, inp, target, programs, templates, drop) -> torch.Tensor:
    """Cross-entropy of the next position's codes, over the positions the delay pattern fills."""
    states, mask = cond.rows(programs, templates, drop)
    out = model(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=inp)
    B, K, T = target.shape
    logits = out.logits.reshape(B, K, T, -1)
    valid = target != model.config.decoder.pad_token_id  # the delay pattern's special positions: not predicted
    return F.cross_entropy(logits[valid], target[valid])


def learning_rate(r: Recipe, step: int) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = min(1.0, (step - r.warmup) / max(1, r.steps - r.warmup))
    return r.lr_final + 0.5 * (r.lr - r.lr_final) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def validate(model, cond: Conditions, held: Codes, r: Recipe) -> dict:
    """Held-out cross-entropy (conditioned, nothing dropped) against the unigram baseline of
    the training codes, in nats per token."""
    model.eval()
    losses = []
    for i in range(r.val_batches):
        inp, target, programs, templates, _ = batch(held, r, i, stream=9)
        losses.append(loss_of(model, cond, inp, target, programs, templates, torch.zeros(len(programs), dtype=torch.bool)).item())
    model.train()
    return {"val_loss": sum(losses) / len(losses)}


def unigram_loss(train: Codes, held: Codes) -> float:
    """Cross-entropy of the held-out codes under each codebook's training frequencies
    (add-one smoothed), in nats per token: what a model that ignores context scores."""
    total, count = 0.0, 0
    for k in range(train.codes.shape[1]):
        freq = torch.bincount(train.codes[:, k].reshape(-1).long(), minlength=train.vocab).double() + 1
        logp = torch.log(freq / freq.sum())
        vals = held.codes[:, k].reshape(-1).long()
        total += -logp[vals].sum().item()
        count += vals.numel()
    return total / count


# -- the run ------------------------------------------------------------------------------

class Run:
    def __init__(self, folder: Path, recipe: Recipe | None, codec_dir: Path | None, data_dir: Path | None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "recipe.json"
        if saved.exists():
            on_disk = json.loads(saved.read_text())
            disk_recipe = Recipe.from_dict(on_disk["recipe"])
            if recipe is not None and recipe != disk_recipe:
                raise SystemExit(f"{saved} holds another recipe; use another --run folder, or drop --set")
            recipe = disk_recipe
            if codec_dir is not None and Path(codec_dir).resolve() != Path(on_disk["codec"]).resolve():
                raise SystemExit(f"{saved} was trained on the codec {on_disk['codec']}; use another --run folder")
            codec_dir = Path(on_disk["codec"])
        if codec_dir is None:
            raise SystemExit("a new run needs --codec DIR (the demo codec: train_codec.py --export)")
        self.recipe = recipe or Recipe()
        self.codec_dir = Path(codec_dir).resolve()
        saved.write_text(json.dumps({"recipe": dataclasses.asdict(self.recipe), "codec": str(self.codec_dir)},
                                    indent=1) + "\n")
        self.data_dir = data_dir or folder.parent / "data_music"

    def codes(self) -> tuple[Codes, Codes]:
        return split(codes_of(self.data_dir, self.codec_dir, self.folder / "codes.pt", self.recipe))

    def restore(self):
        r = self.recipe
        model = build_model(r, self.codec_dir)
        opt = torch.optim.AdamW(trained(model), lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
        ckpt = self.folder / "ckpt.pt"
        step = 0
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            model.decoder.load_state_dict(state["decoder"])
            model.enc_to_dec_proj.load_state_dict(state["proj"])
            opt.load_state_dict(state["optimizer"])
            step = state["step"]
        return model.train(), opt, step

    def save(self, model, opt, step: int) -> None:
        tmp = self.folder / "ckpt.pt.partial"
        torch.save({"decoder": model.decoder.state_dict(), "proj": model.enc_to_dec_proj.state_dict(),
                    "optimizer": opt.state_dict(), "step": step}, tmp)
        os.replace(tmp, self.folder / "ckpt.pt")

    def log(self, record: dict) -> None:
        with open(self.folder / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train(run: Run, stop_after: int | None = None, quiet: bool = False) -> int:
    r = run.recipe
    torch.set_num_threads(r.threads)
    train_codes, held = run.codes()
    model, opt, step = run.restore()
    cond = Conditions(model, build_tokenizer())
    if step == 0:
        run.log({"step": 0, "unigram_val_loss": unigram_loss(train_codes, held),
                 "train_clips": len(train_codes.rows), "held_clips": len(held.rows)})
    end = r.steps if stop_after is None else min(r.steps, step + stop_after)
    started, t0 = step, time.perf_counter()
    while step < end:
        for group in opt.param_groups:
            group["lr"] = learning_rate(r, step)
        loss = loss_of(model, cond, *batch(train_codes, r, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trained(model), r.grad_clip)
        opt.step()
        step += 1
        if step % r.log_every == 0 or step == end:
            record = {"step": step, "loss": loss.item(), "grad_norm": norm.item(), "lr": opt.param_groups[0]["lr"],
                      "s_per_step": (time.perf_counter() - t0) / (step - started)}
            if step % r.val_every == 0 or step == end:
                record |= validate(model, cond, held, r)
            run.log(record)
            if not quiet:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      flush=True)
        if step % r.ckpt_every == 0 or step == end:
            run.save(model, opt, step)
    return step


def export(run: Run, out_dir: Path, half: bool = True) -> Path:
    """The checkpoint's whole MusicGen with `save_pretrained` (float16 unless `half` is off:
    the loaders read it back as float32), with its tokenizer and a training.json."""
    torch.set_num_threads(run.recipe.threads)
    model, _, step = run.restore()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    for config in (model.config, model.config.audio_encoder, model.config.text_encoder, model.config.decoder):
        config._name_or_path = ""  # where the parts were loaded from here: not in the bytes a seed regenerates
    (model.half() if half else model).save_pretrained(out_dir)
    build_tokenizer().save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(
        {"step": step, "dtype": "float16" if half else "float32", "recipe": dataclasses.asdict(run.recipe),
         "codec": json.loads((run.codec_dir / "training.json").read_text()) if (run.codec_dir / "training.json").exists() else None,
         "trainer": "tools/demo_model/train_decoder.py"}, indent=1) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder (checkpoint, codes, log, recipe)")
    p.add_argument("--codec", type=Path, default=None, help="the demo codec directory (new runs)")
    p.add_argument("--data", type=Path, default=None, help="dataset folder (default: beside the run, data_music/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (new runs)")
    p.add_argument("--stop-after", type=int, default=None, help="train this many more steps, then stop")
    p.add_argument("--export", type=Path, default=None, metavar="DIR", help="write the checkpoint's model and exit")
    p.add_argument("--float32", action="store_true", help="--export: keep float32 weights (default float16)")
    args = p.parse_args(argv)
    recipe = Recipe().with_overrides(args.set) if args.set else None
    if recipe is None and not (args.run / "recipe.json").exists():
        recipe = Recipe()
    run = Run(args.run, recipe, args.codec, args.data)
    if args.export is not None:
        print(f"wrote {export(run, args.export, not args.float32)}")
        return 0
    step = train(run, args.stop_after)
    print(f"{run.folder}: at step {step} of {run.recipe.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
