"""tools/demo_model/train_decoder.py: a few steps of a tiny recipe on the codes of a real
FluidSynth dataset through a tiny trained codec, deterministic across fresh runs and
across an interrupted and resumed run; the model it writes is a transformers MusicGen
directory that `--model DIR` loads (its own word-level tokenizer included) and renders."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "demo_model"
sys.path.insert(0, str(TOOLS))

import codec_data  # noqa: E402
import train_codec  # noqa: E402
import train_decoder  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("fluidsynth") is None,
                                reason="needs FluidSynth (scripts/debian-packages.txt) to render the clips")

TINY = train_decoder.Recipe(hidden=16, layers=1, heads=2, ffn=32, text_hidden=8, text_layers=1, text_heads=2,
                            text_ff=16, families=("notes",), programs=(0, 40), per_label=1, batch=2, frames=10,
                            steps=4, warmup=2, log_every=1, ckpt_every=1, val_every=2, val_batches=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(dataset, codec): notes for two programs, and a 4 x 16-entry codec trained 3 steps on them."""
    root = tmp_path_factory.mktemp("demo_decoder")
    spec = codec_data.DataSpec(programs=TINY.programs, per_label=1)
    codec_data.build(root / "data", spec, workers=2)
    recipe = train_codec.Recipe(filters=2, hidden=8, codebook_size=16, batch=2, crop_s=0.1, steps=3, ae_steps=1,
                                warmup=1, fft_sizes=(256, 64), kmeans_batches=2, kmeans_iters=2, data=spec)
    run = train_codec.Run(root / "codec_run", recipe, root / "data")
    train_codec.train(run, quiet=True)
    return root / "data", train_codec.export(run, root / "codec")


def decoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "ckpt.pt", weights_only=False)["decoder"]


def test_two_fresh_runs_and_a_resumed_one_give_identical_weights_and_exports(tmp_path, dirs):
    data, codec = dirs
    runs = {}
    for name in ("a", "b"):
        run = train_decoder.Run(tmp_path / name, TINY, codec, data)
        assert train_decoder.train(run, quiet=True) == TINY.steps
        runs[name] = decoder_weights(run.folder)
    part = train_decoder.Run(tmp_path / "c", TINY, codec, data)
    assert train_decoder.train(part, stop_after=2, quiet=True) == 2
    again = train_decoder.Run(tmp_path / "c", None, None, data)  # recipe and codec read back from the folder
    assert again.recipe == TINY and again.codec_dir == codec.resolve()
    assert train_decoder.train(again, quiet=True) == TINY.steps
    for name in ("b", "c"):
        other = runs["b"] if name == "b" else decoder_weights(again.folder)
        assert runs["a"].keys() == other.keys()
        assert all(torch.equal(runs["a"][k], other[k]) for k in runs["a"]), name
    for name in ("a", "c"):
        train_decoder.export(train_decoder.Run(tmp_path / name, None, None, data), tmp_path / f"out_{name}")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "training.json"):  # every file a seed makes
        assert (tmp_path / "out_a" / f).read_bytes() == (tmp_path / "out_c" / f).read_bytes(), f
    config = (tmp_path / "out_a" / "config.json").read_text()
    assert str(codec.parent) not in config  # no path of this machine (the codec was loaded from there)
    log = [line for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert '"unigram_val_loss"' in log[0] and any('"val_loss"' in line for line in log)


def test_a_run_folder_refuses_another_recipe_or_codec(tmp_path, dirs):
    data, codec = dirs
    train_decoder.Run(tmp_path / "r", TINY, codec, data)
    with pytest.raises(SystemExit, match="another recipe"):
        train_decoder.Run(tmp_path / "r", dataclasses.replace(TINY, lr=1e-2), codec, data)
    with pytest.raises(SystemExit, match="trained on the codec"):
        train_decoder.Run(tmp_path / "r", None, tmp_path, data)
    with pytest.raises(SystemExit, match="needs --codec"):
        train_decoder.Run(tmp_path / "new", TINY, None, data)


def test_batches_keep_the_delay_pattern_and_drop_conditions_by_seed(dirs):
    data, codec = dirs
    codes = train_decoder.codes_of(data, codec, data.parent / "codes.pt", TINY)
    train, held = train_decoder.split(codes)
    assert len(train.rows) + len(held.rows) == 24 and not {r[2] for r in train.rows} & {r[2] for r in held.rows}
    assert codes.vocab == 16 and codes.codes.shape[1:] == (4, 200)
    recipe = dataclasses.replace(TINY, batch=64, cond_dropout=0.25)
    inp, target, programs, templates, drop = train_decoder.batch(train, recipe, 5)
    again = train_decoder.batch(train, recipe, 5)
    assert all(torch.equal(x, y) for x, y in zip((inp, target, programs, templates, drop), again))
    assert inp.shape == (64 * 4, 10 + 3) and target.shape == (64, 4, 13)
    seq = torch.cat([inp.reshape(64, 4, -1)[..., :1], target], dim=-1)  # the whole delayed sequence
    assert (seq[..., 0] == 16).all()  # position 0: the special token in every codebook
    for k in range(4):  # codebook k is special at positions 1..k and after 1 + k + frames
        assert (seq[:, k, 1:1 + k] == 16).all() and (seq[:, k, 1 + k:1 + k + 10] < 16).all()
        assert (seq[:, k, 1 + k + 10:] == 16).all()
    assert 0 < drop.sum() < 64  # about a quarter of the rows unconditioned
    assert set(programs.tolist()) <= set(TINY.programs)


def test_the_export_loads_as_model_dir_with_its_tokenizer_and_renders(tmp_path, dirs):
    from musicsteer.api import render_clip
    from musicsteer.model.loading.load import load_model

    data, codec = dirs
    run = train_decoder.Run(tmp_path / "r", TINY, codec, data)
    train_decoder.train(run, quiet=True)
    out = train_decoder.export(run, tmp_path / "model")
    model = load_model(str(out))
    assert model.format == "transformers"
    assert (model.cfg.hidden, model.cfg.layers, model.cfg.vocab, model.cfg.codebooks) == (16, 1, 16, 4)
    ids = model.text.tokenizer(["solo violin"], return_tensors="pt").input_ids[0].tolist()
    words = train_decoder.prompt_words()
    assert ids == [words.index("solo"), words.index("violin"), 1]  # word ids, then </s>
    assert model.text.tokenizer(["theremin"], return_tensors="pt").input_ids[0].tolist() == [2, 1]  # <unk>
    clip = render_clip(model, "violin", seconds=0.2, seed=3)
    assert clip.codes.shape == (4, 10) and int(clip.codes.max()) < 16
    assert clip.audio.shape[-1] == 10 * 640
