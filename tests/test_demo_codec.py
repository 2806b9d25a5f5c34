"""tools/demo_model/train_codec.py: a few steps of a tiny recipe on a real FluidSynth dataset,
deterministic across fresh runs and across an interrupted and resumed run; the codec it
writes loads through the project's `--codec DIR` loader and streams through the stateful
decoder as its offline decode."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "demo_model"
sys.path.insert(0, str(TOOLS))

import codec_data  # noqa: E402
import train_codec  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("fluidsynth") is None,
                                reason="needs FluidSynth (scripts/debian-packages.txt) to render the clips")

TINY = train_codec.Recipe(
    filters=2, hidden=8, codebook_size=16, batch=2, crop_s=0.1, steps=5, ae_steps=2, warmup=2,
    fft_sizes=(256, 64), kmeans_batches=4, kmeans_iters=3, log_every=1, ckpt_every=1, smooth_upsampling=True,
    data=codec_data.DataSpec(programs=(0,), per_label=1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec_data")
    codec_data.build(d, TINY.data, workers=2)
    return d


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "ckpt.pt", weights_only=False)["model"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_fresh_runs_and_a_resumed_one_give_identical_weights(tmp_path, data_dir):
    runs = {}
    for name in ("a", "b"):
        run = train_codec.Run(tmp_path / name, TINY, data_dir)
        assert train_codec.train(run, quiet=True) == TINY.steps
        runs[name] = weights(run.folder)
    resumed = train_codec.Run(tmp_path / "c", TINY, data_dir)
    assert train_codec.train(resumed, stop_after=3, quiet=True) == 3  # past the quantizer's start (step 2)
    assert torch.load(resumed.folder / "ckpt.pt", weights_only=False)["step"] == 3
    again = train_codec.Run(tmp_path / "c", None, data_dir)  # the recipe is read back from the folder
    assert again.recipe == TINY
    assert train_codec.train(again, quiet=True) == TINY.steps
    assert_same(runs["a"], runs["b"])
    assert_same(runs["a"], weights(again.folder))
    # the quantizer was trained: k-means filled the codebooks and the EMA moved them
    books = [v for k, v in runs["a"].items() if k.endswith("codebook.embed")]
    assert len(books) == 4 and all(b.abs().sum() > 0 for b in books)
    # and the exports are the same bytes
    for name in ("a", "c"):
        train_codec.export(train_codec.Run(tmp_path / name, None, data_dir), tmp_path / f"out_{name}")
    assert (tmp_path / "out_a" / "model.safetensors").read_bytes() == \
        (tmp_path / "out_c" / "model.safetensors").read_bytes()
    log = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert len(log) == TINY.steps and '"levels": 0' in log[0]


def test_a_run_folder_refuses_another_recipe(tmp_path, data_dir):
    train_codec.Run(tmp_path / "r", TINY, data_dir)
    with pytest.raises(SystemExit, match="another recipe"):
        train_codec.Run(tmp_path / "r", dataclasses.replace(TINY, lr=1e-2), data_dir)


def test_held_out_clips_are_not_trained_on(data_dir):
    train, held = codec_data.split(data_dir)
    assert len(held.rows) >= 1 and len(train.rows) + len(held.rows) == 12
    assert not {r.clip for r in train.rows} & {r.clip for r in held.rows}
    x = train.batch(0, 7, 3, 800)
    assert x.shape == (3, 1, 800) and torch.equal(x, train.batch(0, 7, 3, 800))


def test_the_exported_codec_loads_as_codec_dir_and_streams_as_it_decodes(tmp_path, data_dir):
    """The real recipe's shape (4 x 2048 codebooks, hop 640) through `load_model(..., codec=DIR)`."""
    from musicsteer.codec.state import StatefulDecoder
    from musicsteer.model.loading.load import load_unprepared

    run = train_codec.Run(tmp_path / "real", dataclasses.replace(TINY, filters=8, hidden=64, codebook_size=2048,
                                                                steps=3, ae_steps=1, kmeans_batches=2), data_dir)
    train_codec.train(run, quiet=True)
    out = train_codec.export(run, tmp_path / "codec", half=True)  # as the demo codec is committed
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    codec = load_unprepared("tiny", codec=str(out)).codec
    assert next(codec.model.parameters()).dtype == torch.float32
    assert (codec.sample_rate, codec.hop, codec.codebook_size) == (32000, 640, 2048)
    _, held = codec_data.split(data_dir)
    audio = held.audio[0, :32000].astype(np.float32) / 32768.0
    codes = codec.encode(audio, 4)
    assert codes.shape == (4, 50) and int(codes.max()) < 2048
    # its own encode reads the trained codebooks: the nearest entries of level 0, as the trainer finds them
    import codec_vq

    with torch.no_grad():
        z = codec_vq.flat(codec.model.encoder(torch.from_numpy(audio)[None, None]))  # (frames, 64)
        book = codec.model.quantizer.layers[0].codebook.embed
        assert book.abs().sum() > 0  # not the zeros transformers starts with
        assert torch.equal(codes[0], codec_vq.nearest(z, book))
    offline = codec.decode(codes)
    dec = StatefulDecoder(codec, 4)
    parts = [a for f in range(codes.shape[1]) if (a := dec.push(codes[:, f])) is not None]
    streamed = np.concatenate(parts + [dec.flush()])
    assert streamed.shape == offline.shape == (50 * 640,)
    assert np.abs(streamed - offline).max() <= 1e-5 * max(1e-3, np.abs(offline).max())


def test_smooth_upsamplers_start_as_interpolators():
    """A constant input comes out of every transposed convolution constant (no buzz at its
    input rate), and the random ones do not do that."""
    from transformers.models.encodec.modeling_encodec import EncodecConvTranspose1d

    for smooth in (True, False):
        model = train_codec.build_model(dataclasses.replace(TINY, smooth_upsampling=smooth))
        ups = [m for m in model.decoder.modules() if isinstance(m, EncodecConvTranspose1d)]
        assert [m.conv.stride[0] for m in ups] == [8, 5, 4, 4]
        for m in ups:
            x = torch.ones(1, m.conv.in_channels, 12)
            with torch.no_grad():
                y = torch.nn.functional.conv_transpose1d(x, m.conv.weight, None, m.conv.stride)  # (1, C_out, samples)
            s = m.conv.stride[0]
            inner = y[..., s:-s]  # away from the ends, where fewer kernels overlap
            flat = (inner - inner.mean(-1, keepdim=True)).abs().max() <= 1e-5 * inner.abs().max()
            assert bool(flat) == smooth


@pytest.mark.skipif(importlib.util.find_spec("torchcrepe") is None,
                    reason="torchcrepe is installed by scripts/setup.sh (--no-deps)")
def test_eval_codec_prints_and_writes_the_figure(tmp_path, data_dir, capsys):
    import json

    import eval_codec

    run = train_codec.Run(tmp_path / "r", dataclasses.replace(TINY, steps=3, ae_steps=1), data_dir)
    train_codec.train(run, quiet=True)
    out = train_codec.export(run, tmp_path / "codec")
    report = tmp_path / "eval.json"
    assert eval_codec.main(["--codec", str(out), "--data", str(data_dir), "--min-midi", "0", "--max-midi", "127",
                            "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    _, held = codec_data.split(data_dir)
    assert result["n"] == len(held.rows) == len(result["clips"])
    assert [c["clip"] for c in result["clips"]] == [r.clip for r in held.rows]
    assert result["roundtrip_accuracy"] == sum(c["ok"] for c in result["clips"]) / result["n"]
    from musicsteer.probes.pitch import PITCH_CLASSES

    assert all(c["original"] in (*PITCH_CLASSES, "-") for c in result["clips"])
    assert "round trip" in capsys.readouterr().out


def test_eval_codec_refuses_a_missing_codec_in_one_line(tmp_path, data_dir, capsys):
    import eval_codec

    assert eval_codec.main(["--codec", str(tmp_path / "nothing"), "--data", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval_codec: ") and "nothing" in err and len(err.splitlines()) == 1
