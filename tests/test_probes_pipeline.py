"""The probe pipeline end to end with the tiny preset: FluidSynth clips of two concept
families, extraction, RFM and linear probes, a pack, steering with it, and probe
accuracy on generations. Accuracies on a random model mean nothing musically; the
pipeline, the numerics and the file formats are what this proves."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from musicsteer.cli import main
from musicsteer.model.delay import interleave
from musicsteer.model.text import condition_rows
from musicsteer.probes.common import ProbeError
from musicsteer.probes.dataset import DatasetError, build_dataset
from musicsteer.probes.evaluate import run_generation_eval
from musicsteer.probes.extract import ExtractError, ExtractSettings, extract
from musicsteer.steering.pack import ConceptPack
from musicsteer.probes.train import train_pack


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("concept-data")
    build_dataset(out, families=["chords", "intervals"], programs=[0, 24], per_label=1, seed=3, workers=2,
                  progress=False)
    return out


@pytest.fixture(scope="module")
def features(data, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "f"
    extract(tiny, data, out, ExtractSettings(prompt="music", batch=8), progress=False)
    return out


def test_extraction_matches_a_direct_forward(tiny, data, features):
    """Row 5 of the store equals: encode, interleave, forward the CFG batch, pool row 0."""
    with open(features / "index.csv") as f:
        row = list(csv.DictReader(f))[5]
    audio, _ = sf.read(data / row["clip"], dtype="float32")
    codes = tiny.codec.encode(audio, 4)
    seq = interleave(codes, 2048)  # (K, F + K)
    dec = tiny.decoder
    outs = []
    for i in range(dec.cfg.layers):
        dec.add_hook(f"blocks.{i}.out", lambda h, _o=outs: (_o.append(h[0]), h)[1])
    try:
        states, mask = tiny.text.encode("music")
        dec.setup_caches(2, max_len=seq.shape[1], self_attention=False)
        dec.set_condition(*condition_rows(states, mask, 2))
        with torch.inference_mode():
            dec.hidden_states(seq[None].expand(2, -1, -1), torch.arange(seq.shape[1]), use_cache=False)
    finally:
        dec.clear_hooks()
    want = torch.stack([o[1:].mean(0) for o in outs]).numpy()  # (L, D)
    pooled = np.load(features / "pooled.npy", mmap_mode="r")
    np.testing.assert_allclose(pooled[:, 5], want, rtol=1e-4, atol=1e-5)
    meta = json.loads((features / "meta.json").read_text())
    assert meta["layout"] == "delay" and meta["conditioning"]["prompt"] == "music"
    assert np.load(features / "done.npy").all()


def test_extraction_resumes_and_refuses_other_settings(tiny, data, features):
    before = np.load(features / "pooled.npy").copy()
    extract(tiny, data, features, ExtractSettings(prompt="music"), progress=False)  # nothing left to do
    assert np.array_equal(np.load(features / "pooled.npy"), before)
    with pytest.raises(ExtractError, match="other settings"):
        extract(tiny, data, features, ExtractSettings(prompt="music", delay=False), progress=False)


@pytest.mark.parametrize("method", ["rfm", "linear"])
def test_train_pack_and_steer_with_it(features, tmp_path, method, capsys):
    pack_dir = tmp_path / "pack"
    pack = train_pack(features, method=method, budget=1, out_dir=pack_dir, seed=0, progress=False)
    loaded = ConceptPack.load(pack_dir)
    assert set(loaded.names) == set(pack.names) and len(loaded.names) == 24
    want = {f"chords-{q}-{inv}" for q in ("major", "minor", "augmented", "diminished")
            for inv in ("root", "first", "second")}
    want |= {f"intervals-{i}" for i in ("m2", "M2", "m3", "M3", "P4", "TT", "P5", "m6", "M6", "m7", "M7", "P8")}
    assert set(loaded.names) == want
    for c in loaded.concepts.values():
        torch.testing.assert_close(c.directions.norm(dim=-1), torch.ones(2), atol=1e-4, rtol=0)
        assert c.scores.shape == (2,)
    assert (pack_dir / "scores.png").exists()
    name = loaded.names[0]
    base = ["render", "--model", "tiny", "--prompt", "x", "--duration", "0.6", "--greedy", "--no-progress",
            "--out", str(tmp_path / "o.wav")]
    assert main(base + ["--save-tokens", str(tmp_path / "plain.npy")]) == 0
    assert main(base + ["--save-tokens", str(tmp_path / "steered.npy"), "--concepts", str(pack_dir),
                        "--steer", f"{name}=40"]) == 0
    assert not np.array_equal(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "steered.npy"))


def test_probe_accuracy_on_generations(tiny, features, tmp_path):
    pack_dir = tmp_path / "pack"
    train_pack(features, method="linear", families=["intervals"], out_dir=pack_dir, progress=False)
    record = run_generation_eval(tiny, features, pack_dir, "intervals", [0.0, 2.0], per_concept=1, duration=0.4,
                                 prompt="music", gate=1.0, seed=0)
    assert [r["strength"] for r in record["table"]] == [0.0, 2.0]
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["per_concept"]) == 12 for r in record["table"])
    # the unsteered row scores one set of generations against every label: accuracies sum to 1 per clip
    assert sum(record["table"][0]["per_concept"].values()) == pytest.approx(1.0)
    assert record["clap"] is None and "no CLAP" in record["clap_note"]
    assert record["gate_per"] == "layer"  # MusicRFM's gate is eval's default
    assert all(0.0 <= r["detected"] <= 1.0 and len(r["per_concept_detected"]) == 12 for r in record["table"])


def test_eval_judges_generations_with_steering_detached(tiny, features, tmp_path, monkeypatch):
    """The features a generation is judged on come from a decoder with no steering hook in it
    (steered, the last step's strengths would be added to what is judged)."""
    from musicsteer.kernels.hook import KernelHook
    from musicsteer.probes import evaluate

    pack_dir = tmp_path / "pack"
    train_pack(features, method="linear", families=["intervals"], out_dir=pack_dir, progress=False)
    steered_while_judged = []
    original = evaluate.hidden_states

    def judged(model, seqs, settings):
        steered_while_judged.append(any(isinstance(h, KernelHook) for b in model.decoder.blocks
                                        for hooks in b.hooks.values() for h in hooks))
        return original(model, seqs, settings)

    monkeypatch.setattr(evaluate, "hidden_states", judged)
    run_generation_eval(tiny, features, pack_dir, "intervals", [0.0, 2.0], per_concept=1, duration=0.2,
                        prompt="music", gate=1.0, seed=0)
    assert len(steered_while_judged) == 1 + 12 and not any(steered_while_judged)  # unsteered once, then 12 targets


def test_the_unsteered_row_measures_each_targets_detector(tiny, features, tmp_path, monkeypatch):
    """At strength 0 the multiclass accuracy is 1/C whatever the model does; the detected rate is
    the share of unsteered generations each target's own detector fires on."""
    from musicsteer.probes import evaluate

    pack_dir = tmp_path / "pack"
    train_pack(features, method="linear", families=["intervals"], out_dir=pack_dir, progress=False)
    fires = {}

    def first_half(self, X):  # a detector bank where the first six labels' fire on every clip
        out = np.zeros((len(X), len(self.b)), dtype=bool)
        out[:, :6] = True
        fires["calls"] = fires.get("calls", 0) + 1
        return out

    monkeypatch.setattr(evaluate.BalancedRidge, "fires", first_half)
    record = run_generation_eval(tiny, features, pack_dir, "intervals", [0.0], per_concept=2, duration=0.2,
                                 prompt="music", gate=1.0, seed=0)
    row = record["table"][0]
    assert fires["calls"] == 2  # one set of unsteered generations
    first = [f"intervals-{label}" for label in record["labels"][:6]]
    assert all(row["per_concept_detected"][n] == (1.0 if n in first else 0.0) for n in row["per_concept_detected"])
    assert row["detected"] == 0.5 and row["accuracy"] == pytest.approx(1 / 12)  # 1/C, by construction


def test_balanced_detectors_fire_on_their_class():
    from musicsteer.probes.evaluate import BalancedRidge

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [60, 10, 10, 10])  # one large class: balance matters
    centres = rng.normal(size=(4, 16)) * 3
    X = centres[labels] + rng.normal(size=(90, 16))
    fired = BalancedRidge(X, labels, 4).fires(centres[labels] + rng.normal(size=(90, 16)))
    for k in range(4):
        assert fired[labels == k, k].mean() > 0.8 and fired[labels != k, k].mean() < 0.2


def test_extract_at_the_attention_output_and_steer_there(tiny, data, tmp_path, capsys):
    """`--point attn` stores the self-attention outputs; a pack trained on them records the point,
    and a mode that reads that point's quantities (clamp's targets) is refused elsewhere."""
    out = tmp_path / "attn"
    assert main(["probes", "extract", "--model", "tiny", "--dataset", str(data), "--out", str(out),
                 "--point", "attn", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["point"] == "attn"
    with open(out / "index.csv") as f:
        row = list(csv.DictReader(f))[3]
    audio, _ = sf.read(data / row["clip"], dtype="float32")
    seq = interleave(tiny.codec.encode(audio, 4), 2048)
    dec = tiny.decoder
    outs = []
    for i in range(dec.cfg.layers):
        dec.add_hook(f"blocks.{i}.attn", lambda h, _o=outs: (_o.append(h[0]), h)[1])
    try:
        states, mask = tiny.text.encode("music")
        dec.setup_caches(2, max_len=seq.shape[1], self_attention=False)
        dec.set_condition(*condition_rows(states, mask, 2))
        with torch.inference_mode():
            dec.hidden_states(seq[None].expand(2, -1, -1), torch.arange(seq.shape[1]), use_cache=False)
    finally:
        dec.clear_hooks()
    want = torch.stack([o[1:].mean(0) for o in outs]).numpy()
    np.testing.assert_allclose(np.load(out / "pooled.npy")[:, 3], want, rtol=1e-4, atol=1e-5)

    pack_dir = tmp_path / "pack"
    pack = train_pack(out, method="linear", families=["intervals"], out_dir=pack_dir, progress=False)
    assert pack.meta["data"]["point"] == "attn"
    base = ["render", "--model", "tiny", "--prompt", "x", "--duration", "0.2", "--no-progress",
            "--out", str(tmp_path / "o.wav"), "--concepts", str(pack_dir), "--steer", "intervals-M3=0.5"]
    capsys.readouterr()
    assert main(base + ["--steer-mode", "clamp"]) == 2
    assert "trained on the 'attn' hook point" in capsys.readouterr().err
    assert main(base + ["--steer-mode", "clamp", "--steer-point", "attn"]) == 0
    assert main(base) == 0  # add at out with attn directions: allowed, with a warning
    assert main(["probes", "extract", "--model", "tiny", "--dataset", str(data), "--out", str(out),
                 "--no-progress"]) == 2  # the store holds the attn point: another point is refused


def test_pack_for_another_model_is_refused(tmp_path, features):
    pack_dir = tmp_path / "pack"
    train_pack(features, method="linear", families=["chords"], out_dir=pack_dir, progress=False)
    rc = main(["render", "--model", "small", "--prompt", "x", "--duration", "0.2", "--no-progress",
               "--out", str(tmp_path / "o.wav"), "--concepts", str(pack_dir)])
    assert rc == 2


def test_dataset_with_missing_files_is_a_clear_error(tiny, data, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = next((broken / "clips" / "chords").glob("*.wav"))
    victim.unlink()
    with pytest.raises(DatasetError, match=f"{victim.name} is missing") as info:
        extract(tiny, broken, tmp_path / "f", progress=False)
    assert "\n" not in str(info.value)


def test_unknown_family_in_features(features):
    with pytest.raises(ProbeError):
        train_pack(features, families=["tempos"], progress=False)


def tiny_clap(directory):
    """A random CLAP (text and audio towers) with a byte-level BPE tokenizer, saved like a real one."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizerFast,
    )

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["music with warm piano", "techno beat"] * 10, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    text = ClapTextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=64)
    audio = ClapAudioConfig(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], patch_embeds_hidden_size=16,
                            hidden_size=128, projection_hidden_size=32)
    torch.manual_seed(0)
    ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)) \
        .save_pretrained(directory)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tok) \
        .save_pretrained(directory)


def test_clap_column_when_a_clap_model_is_cached(tiny, features, tmp_path, monkeypatch):
    from builders import place_in_hf_cache
    from huggingface_hub import constants

    tiny_clap(tmp_path / "clap")
    place_in_hf_cache(tmp_path / "hub", "laion/clap-htsat-unfused", tmp_path / "clap")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pack_dir = tmp_path / "pack"
    train_pack(features, method="linear", families=["intervals"], out_dir=pack_dir, progress=False)
    record = run_generation_eval(tiny, features, pack_dir, "intervals", [0.0, 3.0], per_concept=1, duration=0.4,
                                 prompt="music", gate=1.0, seed=0)
    assert record["clap"] == "laion/clap-htsat-unfused"
    assert all(-1.0 <= row["clap"] <= 1.0 for row in record["table"])
    assert record["table"][0]["clap"] != record["table"][1]["clap"]


def test_a_chunk_is_pure_and_a_resume_writes_the_same_bits(tiny, data, features, tmp_path):
    """A clip's features do not depend on its chunk-mates, and a store continued after its
    later chunks were lost (done marks cleared, values zeroed) is the uninterrupted one."""
    from musicsteer.probes.extract import chunk_rows, extract_chunk, read_manifest

    rows = read_manifest(data)
    together = extract_chunk(tiny, data, rows[:3], ExtractSettings()).pooled  # (L, 3, D)
    alone = np.concatenate([extract_chunk(tiny, data, [r], ExtractSettings()).pooled for r in rows[:3]], axis=1)
    assert np.array_equal(together, alone)
    assert [list(c) for c in chunk_rows(5, 2)] == [[0, 1], [2, 3], [4]]

    import shutil

    store = tmp_path / "f"
    shutil.copytree(features, store)
    done, pooled = np.load(store / "done.npy", mmap_mode="r+"), np.load(store / "pooled.npy", mmap_mode="r+")
    done[20:], pooled[:, 20:] = False, 0.0
    done.flush(), pooled.flush()
    del done, pooled
    extract(tiny, data, store, ExtractSettings(prompt="music", batch=8), progress=False)
    assert np.array_equal(np.load(store / "pooled.npy"), np.load(features / "pooled.npy"))
    with pytest.raises(ExtractError, match="chunks of 8 clips; re-run with --batch 8"):
        extract(tiny, data, store, ExtractSettings(prompt="music", batch=4), progress=False)
