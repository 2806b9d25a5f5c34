"""Connecting to Ray for `--engine ray`: an existing cluster (`--address auto` or
HOST:PORT, or RAY_ADDRESS), or a local one started for this command (no address).

Every way this can fail (Ray not installed, nothing listening at the address, a cluster
that refuses the connection) becomes a `ClusterError`: one line, exit status 2, raised
before any work is handed out, so nothing already written is touched.
"""

from __future__ import annotations

import importlib.util
import os
import socket

from ...errors import MusicsteerError

INSTALL = "pip install 'musicsteer[ray]' (or pip install ray)"
CONNECT_TIMEOUT_S = 3.0


class ClusterError(MusicsteerError):
    pass


def require_ray(what: str = "--engine ray"):
    """The `ray` module, or a ClusterError saying in one line how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise ClusterError(f"{what} needs Ray, which is not installed: {INSTALL}")
    import ray

    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT address must accept a TCP connection within a few seconds (Ray itself
    retries for much longer before it gives up)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected auto or HOST:PORT (the head's GCS port, 6379 "
                           "unless `ray start --head --port` chose another)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster at {address} ({exc.strerror or exc}); start one with "
                           "`ray start --head` or check --address") from None


def connect(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at `address` (auto, HOST:PORT or ray://...), or start a local Ray
    with `num_cpus`/`num_gpus` when there is none. Already connected: nothing to do."""
    ray = require_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": "ERROR", "log_to_driver": False, "configure_logging": True}
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # "local": a new Ray for this run, never one that happens to run on this machine
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **quiet)
    except ConnectionError as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        raise ClusterError(f"cannot join the Ray cluster at {address or 'this machine'}: {first}") from None
    except (RuntimeError, ValueError) as exc:  # e.g. auth token missing, version mismatch
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterError(f"Ray refused to start or connect ({address or 'local'}): {first}") from None


def cause(exc: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, unwrapped from Ray's RayTaskError."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


def reraise_user_error(exc: BaseException) -> None:
    """Raise the project's own error from inside a task as itself (one line); anything
    else is left to the caller."""
    inner = cause(exc)
    if isinstance(inner, MusicsteerError):
        raise inner from None
