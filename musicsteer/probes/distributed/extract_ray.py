"""`probes extract --engine ray`: a pool of Ray actors, each loading the model once (one
per GPU where the cluster has GPUs), pulling the store's pending chunks.

The driver (this process) is the only writer of the feature store and of its done marks
(`extract.StoreWriter`): an actor computes `extract_chunk` and sends the features back.
So a killed worker loses only its chunks in flight (Ray restarts the actor and retries
them), a killed driver loses only the chunks in flight (the re-run, under either engine,
continues from the done marks), and both engines write the same bits for a chunk.

Workers read the clips themselves: the dataset must be visible on every node, at the
same path or at `worker_dataset`; each worker checks its copy against the driver's
manifest by hash before it extracts anything.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..extract import ExtractError, ExtractSettings, StoreWriter, read_manifest
from .cluster import ClusterError, connect, reraise_user_error

IN_FLIGHT = 2  # chunks queued per actor: one computing, one waiting (no idle gap between them)
RESTARTS = 3  # a worker killed this many times in one run ends the run (Ray retries its chunks until then)


@dataclass(frozen=True)
class PoolSettings:
    address: str | None = None  # None: RAY_ADDRESS, or a local Ray started for the run
    workers: int | None = None  # None: one per GPU, else one per cpus_per_worker CPUs of the cluster
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    worker_dataset: str | None = None  # the dataset's path as the workers see it (default: the same)


@dataclass(frozen=True)
class ModelSpec:
    """What `load_model` needs, sent to every worker (the device is the worker's own)."""
    spec: str
    text_encoder: str | None = None
    codec: str | None = None
    dtype: str = "float32"
    weights: str = "full"
    options: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Extractor:
    """One worker: checks it sees the dataset, loads the model once, extracts chunks.
    Loading is lazy, so that an actor Ray restarts after a crash reloads on its first chunk."""

    def __init__(self, model: ModelSpec, dataset: str, manifest_sha: str, settings: ExtractSettings,
                 use_gpu: bool, threads: int) -> None:
        self.spec, self.dataset, self.manifest_sha = model, Path(dataset), manifest_sha
        self.settings, self.use_gpu, self.threads = settings, use_gpu, threads
        self.model = None

    def setup(self) -> dict:
        import ray
        import torch

        from ...model.loading.load import load_model
        from ..extract import model_info

        node = ray.util.get_node_ip_address()
        manifest = self.dataset / "manifest.csv"
        try:
            sha = file_sha256(manifest)
        except OSError as exc:
            raise ExtractError(f"a worker on {node} cannot see the dataset at {self.dataset} ({exc.strerror}); "
                               "put it on a directory every node mounts, or pass --worker-dataset") from None
        if sha != self.manifest_sha:
            raise ExtractError(f"a worker on {node} sees another dataset at {self.dataset} (its manifest.csv "
                               "differs from the driver's)")
        if self.model is None:
            torch.set_num_threads(self.threads)
            self.model = load_model(self.spec.spec, text_encoder=self.spec.text_encoder, codec=self.spec.codec,
                                    device="cuda" if self.use_gpu else "cpu", dtype=getattr(torch, self.spec.dtype),
                                    weights=self.spec.weights)
        return model_info(self.model) | {"pid": os.getpid(), "node": node}

    def run(self, k: int, rows: list[dict]):
        from ..extract import extract_chunk

        if self.model is None:
            self.setup()
        return k, extract_chunk(self.model, self.dataset, rows, self.settings)


def _pool_size(ray, pool: PoolSettings) -> tuple[int, float]:
    """(workers, GPUs per worker), checked against what the cluster has."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    per_gpu = pool.gpus_per_worker if pool.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if pool.cpus_per_worker <= 0 or per_gpu < 0:
        raise ClusterError("--cpus-per-worker must be positive and --gpus-per-worker not negative")
    if per_gpu > gpus or pool.cpus_per_worker > cpus:
        raise ClusterError(f"a worker asks for {pool.cpus_per_worker:g} CPU and {per_gpu:g} GPU; the cluster "
                           f"has {cpus:g} CPU and {gpus:g} GPU in all")
    if pool.workers is not None:
        if pool.workers < 1:
            raise ClusterError(f"--workers must be at least 1 (got {pool.workers})")
        return pool.workers, per_gpu
    fit = int(gpus // per_gpu) if per_gpu else int(cpus // pool.cpus_per_worker)
    return max(1, fit), per_gpu


def extract_ray(model: ModelSpec, dataset: Path, out: Path, settings: ExtractSettings = ExtractSettings(),
                pool: PoolSettings = PoolSettings(), progress: bool = True, log=print) -> Path:
    """Extract every pending chunk of the store at `out` on a Ray actor pool; see the module."""
    rows = read_manifest(dataset)  # the driver's own check of the dataset, before any worker starts
    if not rows:
        raise ExtractError(f"{dataset}/manifest.csv lists no clips")
    manifest_sha = file_sha256(Path(dataset) / "manifest.csv")
    connect(pool.address, num_cpus=pool.workers and int(pool.workers * pool.cpus_per_worker))
    import ray

    n_workers, per_gpu = _pool_size(ray, pool)
    actor = ray.remote(Extractor).options(num_cpus=pool.cpus_per_worker, num_gpus=per_gpu,
                                          max_restarts=RESTARTS, max_task_retries=RESTARTS)
    threads = max(1, int(pool.cpus_per_worker))
    where = pool.worker_dataset or str(Path(dataset).resolve())
    actors = [actor.remote(model, where, manifest_sha, settings, per_gpu > 0, threads) for _ in range(n_workers)]
    try:
        infos = _gather(ray, [a.setup.remote() for a in actors])
        computes = {repr(i["compute"]) for i in infos}
        if len(computes) > 1:
            raise ClusterError(f"the workers run on different devices or dtypes ({', '.join(sorted(computes))}); "
                               "features would depend on where a chunk ran")
        for i, info in enumerate(infos):
            log(f"worker {i}: pid {info['pid']} on {info['node']} ({info['compute']['device']}, "
                f"{info['compute']['dtype']})")
        store = StoreWriter(out, dataset, rows, {"model": infos[0]["model"], "compute": infos[0]["compute"]},
                            settings)
        _drain(ray, actors, store, rows, progress)
    finally:
        for a in actors:
            ray.kill(a)
    return Path(out)


def _gather(ray, refs: list) -> list:
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        reraise_user_error(exc)
        raise ClusterError(f"a worker failed to start: {str(exc).strip().splitlines()[-1]}") from None
    except ray.exceptions.RayActorError as exc:
        raise ClusterError(f"a worker died while starting: {str(exc).strip().splitlines()[0]}") from None


def _drain(ray, actors: list, store: StoreWriter, rows: list[dict], progress: bool) -> None:
    """Hand out the pending chunks, IN_FLIGHT per actor, and write each as it comes back."""
    from tqdm import tqdm

    queue = iter(store.pending())
    flying: dict = {}  # ref -> actor

    def submit(a) -> None:
        k = next(queue, None)
        if k is not None:
            flying[a.run.remote(k, [rows[i] for i in store.chunks[k]])] = a

    with tqdm(total=len(store.pending()), desc="extract (ray)", unit="chunk", disable=not progress) as bar:
        for a in actors:
            for _ in range(IN_FLIGHT):
                submit(a)
        while flying:
            [ref], _ = ray.wait(list(flying), num_returns=1)
            a = flying.pop(ref)
            try:
                k, features = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                reraise_user_error(exc)
                raise ClusterError(f"a chunk failed on a worker: {str(exc).strip().splitlines()[-1]}") from None
            except ray.exceptions.RayActorError as exc:
                raise ClusterError(f"a worker died {RESTARTS + 1} times ({str(exc).strip().splitlines()[0]}); "
                                   f"what was extracted is kept in {store.out}: re-run to continue") from None
            store.write(k, features)
            bar.update()
            submit(a)
