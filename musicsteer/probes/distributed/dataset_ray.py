"""`probes dataset --engine ray`: clips rendered as Ray tasks, written by the driver.

Each task renders one clip into a temporary directory on its worker and returns the
MIDI and WAV bytes; the driver writes them under the dataset directory with the local
engine's `.partial`-then-rename rule (MIDI, then WAV: a WAV under its final name is
complete). So the dataset directory need not be shared with the workers ("per-node
rendering"), and the bytes are those the local engine writes: FluidSynth is
deterministic for one build and soundfont, and every worker checks both first: the
soundfont at the driver's path by SHA-256, and FluidSynth's version line.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from ..dataset import ClipTask, DatasetError, Renderer, find_fluidsynth, render_task, tool_versions
from .cluster import ClusterError, connect, reraise_user_error
from .extract_ray import file_sha256

IN_FLIGHT_PER_CPU = 4  # tasks queued per cluster CPU: enough to keep workers busy, few lost to Ctrl-C


@functools.lru_cache(maxsize=4)
def _checked(soundfont: str, sha256: str, fluidsynth_version: str) -> str:
    """This worker's FluidSynth, once its soundfont and FluidSynth are checked to be the driver's."""
    import ray

    node = ray.util.get_node_ip_address()
    try:
        have = file_sha256(Path(soundfont))
    except OSError as exc:
        raise DatasetError(f"the worker on {node} has no soundfont at {soundfont} ({exc.strerror}); install it "
                           "at the same path on every node") from None
    if have != sha256:
        raise DatasetError(f"the soundfont at {soundfont} on {node} is not the driver's (SHA-256 {have[:12]}..., "
                           f"driver {sha256[:12]}...)")
    fluidsynth = find_fluidsynth()
    version = tool_versions(fluidsynth)["fluidsynth"]
    if version != fluidsynth_version:
        raise DatasetError(f"FluidSynth on {node} is {version!r}, the driver's is {fluidsynth_version!r}: "
                           "renders would differ")
    return fluidsynth


def render_bytes(task: ClipTask, renderer: Renderer, sha256: str, fluidsynth_version: str) -> tuple[bytes, bytes]:
    """One clip rendered on this worker: (MIDI bytes, WAV bytes)."""
    here = Renderer(_checked(renderer.soundfont, sha256, fluidsynth_version), renderer.soundfont,
                    renderer.sample_rate)
    scratch = Path(tempfile.mkdtemp(prefix="musicsteer-clip-"))
    try:
        render_task(task, scratch, here)
        return (scratch / task.mid).read_bytes(), (scratch / task.wav).read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_clip(out: Path, task: ClipTask, mid: bytes, wav: bytes) -> None:
    for rel, data in ((task.mid, mid), (task.wav, wav)):  # WAV last: its final name means complete
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def ray_renderer(address: str | None, num_cpus: int | None = None):
    """A replacement for the local engine's `_render_all(todo, out, renderer, progress)`."""

    def render_all(todo: list[ClipTask], out: Path, renderer: Renderer, progress: bool) -> None:
        from tqdm import tqdm

        connect(address, num_cpus=num_cpus)
        import ray

        sha, version = file_sha256(Path(renderer.soundfont)), tool_versions(renderer.fluidsynth)["fluidsynth"]
        remote = ray.remote(num_cpus=1, max_retries=3)(render_bytes)
        window = max(1, int(ray.cluster_resources().get("CPU", 1)) * IN_FLIGHT_PER_CPU)
        queue, flying = iter(todo), {}
        with tqdm(total=len(todo), unit="clip", desc="render (ray)", disable=None if progress else True) as bar:
            try:
                while True:
                    while len(flying) < window and (task := next(queue, None)) is not None:
                        flying[remote.remote(task, renderer, sha, version)] = task
                    if not flying:
                        break
                    [ref], _ = ray.wait(list(flying), num_returns=1)
                    task = flying.pop(ref)
                    try:
                        mid, wav = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        reraise_user_error(exc)
                        raise ClusterError(f"rendering {task.wav} failed on a worker: "
                                           f"{str(exc).strip().splitlines()[-1]}") from None
                    write_clip(out, task, mid, wav)
                    bar.update()
            finally:
                for ref in flying:
                    ray.cancel(ref)

    return render_all
