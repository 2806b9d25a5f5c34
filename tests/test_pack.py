"""Concept packs: files, validation, and the `concepts` and `render --steer` command lines."""

import json

import numpy as np
import pytest
import torch

from musicsteer.cli import main
from musicsteer.model.config import PRESETS
from musicsteer.steering.pack import ConceptPack, PackError

TINY = PRESETS["tiny"]


def test_round_trip(tmp_path):
    pack = ConceptPack.random(["cmaj", "g#min"], TINY, "tiny", seed=2)
    pack.save(tmp_path / "p")
    again = ConceptPack.load(tmp_path / "p")
    assert again.names == ["cmaj", "g#min"]
    assert torch.equal(again["cmaj"].directions, pack["cmaj"].directions)
    meta = json.loads((tmp_path / "p" / "concepts.json").read_text())
    assert meta["model"] == {"id": "tiny", "layers": 2, "hidden": 64} and meta["method"] == "random"
    assert "sign" in meta and meta["concepts"][1]["name"] == "g#min"
    torch.testing.assert_close(again["cmaj"].directions.norm(dim=-1), torch.ones(2))


def test_user_vectors_are_normalised_and_broadcast(tmp_path):
    v = np.arange(64, dtype=np.float32) + 1
    pack = ConceptPack.from_vectors({"up": v}, TINY, "tiny")
    assert pack["up"].directions.shape == (2, 64)
    torch.testing.assert_close(pack["up"].directions[1], torch.tensor(v / np.linalg.norm(v)))
    with pytest.raises(PackError, match="shape"):
        ConceptPack.from_vectors({"bad": np.ones(10)}, TINY, "tiny")
    with pytest.raises(PackError, match="zero or non-finite"):
        ConceptPack.from_vectors({"bad": np.zeros(64)}, TINY, "tiny")


def test_pack_for_another_shape_is_a_clear_error():
    pack = ConceptPack.random(["x"], PRESETS["tiny"], "tiny")
    with pytest.raises(PackError, match=r"made for tiny with 2 layers x 64 hidden; this model has 24 layers x 1024"):
        pack.check_fits(PRESETS["small"])


def test_bad_pack_directories(tmp_path):
    with pytest.raises(PackError, match="concepts.json is missing"):
        ConceptPack.load(tmp_path)
    ConceptPack.random(["x"], TINY, "tiny").save(tmp_path / "p")
    (tmp_path / "p" / "directions.safetensors").write_bytes(b"junk")
    with pytest.raises(PackError, match="cannot read"):
        ConceptPack.load(tmp_path / "p")
    with pytest.raises(PackError, match="no concept 'y'"):
        ConceptPack.random(["x"], TINY, "tiny")["y"]


def test_cli_make_show_and_steer(tmp_path, capsys):
    vec = tmp_path / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32))
    assert main(["concepts", "make", "--model", "tiny", "--out", str(tmp_path / "p"), "--random", "cmaj",
                 "--vector", f"mine={vec}"]) == 0
    assert main(["concepts", "list", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["cmaj", "mine"]
    assert main(["concepts", "show", str(tmp_path / "p")]) == 0
    assert "2 concepts, model tiny (2 layers x 64)" in capsys.readouterr().out

    base = ["render", "--model", "tiny", "--prompt", "x", "--duration", "0.4", "--greedy", "--no-progress",
            "--out", str(tmp_path / "o.wav")]
    assert main(base + ["--save-tokens", str(tmp_path / "plain.npy")]) == 0
    assert main(base + ["--save-tokens", str(tmp_path / "steered.npy"), "--concepts", str(tmp_path / "p"),
                        "--steer", "cmaj=30", "--schedule", "cmaj=crossfade:mine:10"]) == 0
    assert not np.array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "steered.npy"))


@pytest.mark.parametrize("extra, message", [
    (["--steer", "cmaj=1"], "need a concept pack"),
    (["--concepts", "PACK", "--steer", "nope=1"], "no concept 'nope' in this pack; it has: cmaj"),
    (["--concepts", "PACK", "--steer", "cmaj=loud"], "the strength must be a number"),
    (["--concepts", "PACK", "--steer", "cmaj"], "expected NAME=VALUE"),
    (["--concepts", "PACK", "--schedule", "cmaj=wobble:3"], "unknown schedule 'wobble'"),
    (["--concepts", "PACK", "--steer-layers", "top:0"], "layer selection"),
    (["--concepts", "SMALLPACK"], "made for small with 24 layers"),
])
def test_render_steering_errors(tmp_path, capsys, extra, message):
    ConceptPack.random(["cmaj"], TINY, "tiny").save(tmp_path / "pack")
    ConceptPack.random(["cmaj"], PRESETS["small"].with_(layers=24), "small").save(tmp_path / "small")
    extra = [str(tmp_path / "pack") if e == "PACK" else str(tmp_path / "small") if e == "SMALLPACK" else e
             for e in extra]
    rc = main(["render", "--model", "tiny", "--prompt", "x", "--duration", "0.2", "--no-progress",
               "--out", str(tmp_path / "o.wav"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
