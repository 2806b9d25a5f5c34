"""A real two-node Ray cluster on this machine, for tests: `ray start --head` and a second
`ray start --address`, each a separate process started with `--block` so that stopping it
(SIGTERM) stops the Ray processes it started, and nothing else.

Small: one CPU per node, an 80 MB object store each, no dashboard, its own temporary
directory, its own auth token (never ~/.ray). `env` is what a client process needs to join.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
STORE_BYTES = 80_000_000


@dataclass
class RayCluster:
    address: str
    env: dict
    temp_dir: str
    procs: list = field(default_factory=list)
    started_s: float = 0.0

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             f"--object-store-memory={STORE_BYTES}", "--disable-usage-stats", *args],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def start_cluster(nodes: int = 2, timeout: float = 120.0) -> RayCluster:
    """Start the head and `nodes - 1` more nodes, and join it from this process (its
    environment gets the cluster's token, which Ray reads once: import ray after this);
    return once all nodes are alive."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env = dict(os.environ, **auth)
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", env, temp)
    started = time.perf_counter()
    deadline = started + timeout
    cluster.procs.append(_node(["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false"],
                               env, Path(temp) / "head.log"))
    try:
        while not _listening(port):
            _check_alive(cluster, deadline)
            time.sleep(0.2)
        os.environ.update(auth)
        import ray

        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        for i in range(1, nodes):
            cluster.procs.append(_node([f"--address={cluster.address}"], env, Path(temp) / f"node{i}.log"))
        while sum(n["Alive"] for n in ray.nodes()) < nodes:
            _check_alive(cluster, deadline)
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    cluster.started_s = time.perf_counter() - started
    return cluster


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _check_alive(cluster: RayCluster, deadline: float) -> None:
    for p in cluster.procs:
        if p.poll() is not None:
            raise RuntimeError(f"a ray node exited ({p.returncode}); see {cluster.temp_dir}/*.log")
    if time.perf_counter() > deadline:
        raise RuntimeError(f"the ray cluster did not start in time; see {cluster.temp_dir}/*.log")
