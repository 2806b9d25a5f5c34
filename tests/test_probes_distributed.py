"""The probe pipeline on a real two-node Ray cluster (tests/ray_cluster.py) against the
local engine: bit-identical features, byte-identical clips, the same pack, and the
failures (a worker or the driver killed mid-run, a bad address, a worker that cannot see
the dataset, Ray missing) each ending in one line with nothing extracted lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import importlib.util

import numpy as np
import pytest

from musicsteer.probes.dataset import build_dataset
from musicsteer.probes.distributed.extract_ray import ModelSpec, PoolSettings, extract_ray
from musicsteer.probes.extract import ExtractError, ExtractSettings, extract
from ray_cluster import free_port, start_cluster

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


def cli(cluster, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "musicsteer", *args], cwd=REPO, env=env or cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def extract_args(cluster, data, out, *more: str) -> list[str]:
    return ["probes", "extract", "--model", "tiny", "--dataset", str(data), "--out", str(out), "--batch",
            str(SETTINGS.batch), "--no-progress", "--engine", "ray", "--address", cluster.address, *more]


def wait_for_done(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> int:
    """Rows marked done in the store, once at least `at_least` are (polling its done.npy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "done.npy").exists():
            n = int(np.load(out / "done.npy").sum())
            if n >= at_least:
                return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{out}: fewer than {at_least} rows done in time")


def test_a_killed_worker_then_a_killed_driver_lose_nothing(cluster, tiny, data, local_features, tmp_path):
    """One run: a worker is SIGKILLed once a chunk is in, the run goes on, then the driver is
    SIGKILLed; the store is continued by the Ray engine and, from a copy, by the local one."""
    out = tmp_path / "f"
    proc = cli(cluster, *extract_args(cluster, data, out, "--workers", "2"))
    pids = []
    while len(pids) < 2:
        line = proc.stdout.readline()
        assert line, proc.communicate()
        if line.startswith("worker "):
            pids.append(int(line.split("pid ")[1].split()[0]))
    at_kill = wait_for_done(out, proc, 1)
    os.kill(pids[0], signal.SIGKILL)
    after = wait_for_done(out, proc, at_kill + 2 * SETTINGS.batch)  # the run goes on without it
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    done = int(np.load(out / "done.npy").sum())
    assert at_kill < after <= done < 24, "the run was over before its driver was killed"
    shutil.copytree(out, tmp_path / "copy")
    extract(tiny, data, tmp_path / "copy", SETTINGS, progress=False)
    same_store(local_features, tmp_path / "copy")
    extract_ray(ModelSpec("tiny"), data, out, SETTINGS, PoolSettings(workers=1), progress=False, log=lambda _: None)
    same_store(local_features, out)


@pytest.fixture
def partial(local_features, tmp_path):
    """A copy of the local store with its second half not yet extracted."""
    out = tmp_path / "partial"
    shutil.copytree(local_features, out)
    done = np.load(out / "done.npy", mmap_mode="r+")
    done[12:] = False
    done.flush()
    return out


def snapshot(store: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(store.iterdir()) if f.is_file()}


def test_an_unreachable_address_is_one_line(cluster, data, partial):
    before = snapshot(partial)
    proc = cli(cluster, *extract_args(cluster, data, partial)[:-1], f"127.0.0.1:{free_port()}")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and "no Ray cluster at 127.0.0.1:" in stderr, stderr
    assert snapshot(partial) == before


def test_a_worker_that_cannot_see_the_dataset_is_one_line(cluster, data, partial, tmp_path):
    before = snapshot(partial)
    with pytest.raises(ExtractError, match="cannot see the dataset at /nonexistent") as info:
        extract_ray(ModelSpec("tiny"), data, partial, SETTINGS, PoolSettings(workers=1, worker_dataset="/nonexistent"),
                    progress=False)
    assert "\n" not in str(info.value)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    with open(other / "manifest.csv", "a") as f:
        f.write("\n")
    with pytest.raises(ExtractError, match="sees another dataset"):
        extract_ray(ModelSpec("tiny"), data, partial, SETTINGS, PoolSettings(workers=1, worker_dataset=str(other)),
                    progress=False)
    assert snapshot(partial) == before


WITHOUT_RAY = '''
import importlib.machinery, sys


class WithoutRay(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "ray" else super().find_spec(name, path, target)


sys.meta_path[:] = [WithoutRay if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.mark.parametrize("command", ["extract", "dataset", "train"])
def test_without_ray_the_engine_says_how_to_install_it(data, partial, tmp_path, command):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_RAY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(tmp_path / "site"),
                                                                    os.environ.get("PYTHONPATH")))))
    args = {"extract": ["--model", "tiny", "--dataset", str(data), "--out", str(partial)],
            "dataset": ["--out", str(tmp_path / "d"), "--families", "chords", "--programs", "0"],
            "train": ["--features", str(partial), "--out", str(tmp_path / "pack")]}[command]
    before = snapshot(partial)
    proc = subprocess.run([sys.executable, "-m", "musicsteer", "probes", command, *args, "--engine", "ray"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"musicsteer: error: probes {command} --engine ray needs Ray, which is not "
                                        "installed: pip install 'musicsteer[ray]' (or pip install ray)"]
    assert snapshot(partial) == before and not (tmp_path / "d").exists()


def test_the_commands_on_ray_write_what_the_local_ones_write(cluster, data, local_features, tmp_path, capsys):
    from musicsteer.cli import main

    for engine in ("local", "ray"):
        ray_args = ["--engine", "ray", "--address", cluster.address] if engine == "ray" else []
        assert main(["probes", "dataset", "--out", str(tmp_path / f"d-{engine}"), "--families", "chords",
                     "--programs", "24", "--seed", "5", "--no-progress", *ray_args]) == 0
        assert main(["probes", "train", "--features", str(local_features), "--out", str(tmp_path / f"p-{engine}"),
                     "--method", "linear", "--no-progress", *ray_args]) == 0
    for name in ("d-local/manifest.csv", "p-local/directions.safetensors", "p-local/concepts.json"):
        assert (tmp_path / name.replace("local", "ray")).read_bytes() == (tmp_path / name).read_bytes(), name
    wavs = sorted((tmp_path / "d-local" / "clips" / "chords").glob("*.wav"))
    assert len(wavs) == 12
    for wav in wavs:
        assert (tmp_path / "d-ray" / "clips" / "chords" / wav.name).read_bytes() == wav.read_bytes()
    assert "on Ray (127.0.0.1:" in capsys.readouterr().out


def test_without_an_address_a_local_ray_is_started_and_stopped(local_features, tmp_path):
    """`probes train --engine ray` with no cluster named: a Ray of its own (small object
    store, a temporary directory), gone once the command ends; the same pack as local."""
    from musicsteer.probes.train import train_pack

    temp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": str(temp), "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.005",
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-m", "musicsteer", "probes", "train", "--features",
                               str(local_features), "--out", str(tmp_path / "p"), "--method", "linear", "--no-progress",
                               "--engine", "ray"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert any(temp.glob("ray/session_*")), "the run did not start its own Ray under RAY_TMPDIR"
        train_pack(local_features, method="linear", out_dir=tmp_path / "local", progress=False)
        for f in ("directions.safetensors", "concepts.json"):
            assert (tmp_path / "p" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
        deadline = time.monotonic() + 30
        while (left := [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
                        .stdout.splitlines() if str(temp) in line]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes outlived the command: {left}"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("command, flags", [
    (["extract", "--model", "tiny", "--dataset", "d", "--out", "f"], ["--workers", "2", "--address", "auto"]),
    (["train", "--features", "f", "--out", "p"], ["--gpus-per-task", "0.5"]),
    (["dataset", "--out", "d"], ["--address", "auto"]),
])
def test_ray_options_without_the_ray_engine_are_refused(tmp_path, capsys, command, flags):
    from musicsteer.cli import main

    assert main(["probes", *command, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with --engine ray" in err[0] and flags[0] in err[0], err
