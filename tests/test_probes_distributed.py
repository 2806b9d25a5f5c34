"""The probe pipeline on a real two-node Ray cluster (tests/ray_cluster.py) against the
local engine: bit-identical features, byte-identical clips, the same pack, and the
failures (a worker or the driver killed mid-run, a bad address, a worker that cannot see
the dataset, Ray missing) each ending in one line with nothing extracted lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import importlib.util

import numpy as np
import pytest

from musicsteer.probes.dataset import build_dataset
from musicsteer.probes.distributed.extract_ray import ModelSpec, PoolSettings, extract_ray
from musicsteer.probes.extract import ExtractSettings, extract
from ray_cluster import start_cluster

# ray itself is imported by the cluster fixture, after it has set the cluster's auth token
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is the optional extra musicsteer[ray]; scripts/setup.sh installs it")

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ExtractSettings(prompt="music", batch=2)


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(nodes=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-data")
    build_dataset(out, families=["chords"], programs=[0, 24], per_label=1, seed=5, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def local_features(tiny, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "f"
    extract(tiny, data, out, SETTINGS, progress=False)
    return out


def same_store(a: Path, b: Path) -> None:
    assert np.load(b / "done.npy").all()
    assert np.array_equal(np.load(a / "pooled.npy"), np.load(b / "pooled.npy"))  # bit for bit
    assert (a / "index.csv").read_bytes() == (b / "index.csv").read_bytes()


def test_two_workers_on_two_nodes_match_the_local_engine(cluster, data, local_features, tmp_path):
    lines = []
    extract_ray(ModelSpec("tiny"), data, tmp_path / "f", SETTINGS, PoolSettings(workers=2), progress=False,
                log=lines.append)
    same_store(local_features, tmp_path / "f")
    assert len(lines) == 2 and all("pid" in line and "(cpu, float32)" in line for line in lines)


def test_dataset_on_ray_writes_the_local_engines_bytes(cluster, data, tmp_path):
    from musicsteer.probes.distributed.dataset_ray import ray_renderer

    report = build_dataset(tmp_path / "d", families=["chords"], programs=[0], per_label=1, seed=5, progress=False,
                           render_all=ray_renderer(cluster.address))
    assert report.rendered == 12
    for wav in sorted((tmp_path / "d" / "clips" / "chords").glob("*.wav")):
        for f in (wav, wav.with_suffix(".mid")):
            assert f.read_bytes() == (data / "clips" / "chords" / f.name).read_bytes(), f.name


def test_train_on_ray_writes_the_local_engines_pack(cluster, local_features, tmp_path):
    from musicsteer.probes.distributed.train_ray import ray_fitter
    from musicsteer.probes.train import train_pack

    for name, engine in (("local", None), ("ray", ray_fitter(cluster.address))):
        train_pack(local_features, method="rfm", budget=2, seed=1, out_dir=tmp_path / name, progress=False,
                   engine=engine)
    for f in ("directions.safetensors", "concepts.json", "evaluation.csv"):
        assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
