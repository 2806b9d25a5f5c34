"""`probes train --engine ray`: the per-layer, per-concept probe searches as Ray tasks.

`train.train_pack` hands its engine groups of fits: one group per family and layer (the
layer's features and the fits that share them). Here each group's features go into Ray's
object store once and each fit is one task (a fractional GPU each with `gpus_per_task`);
at most `GROUPS_IN_STORE` groups' features are held at a time, so memory stays a few
layers' worth whatever the model's depth. The driver assembles and writes the pack; the
fits are seeded per concept and layer, so the pack is the local engine's.
"""

from __future__ import annotations

from .cluster import ClusterError, connect, reraise_user_error

GROUPS_IN_STORE = 4


def _call(X, fn, args):
    return fn(X, *args)


def ray_fitter(address: str | None, gpus_per_task: float = 0.0, num_cpus: int | None = None):
    """An `engine` for `train_pack`: runs its groups of fits on the Ray cluster at `address`."""
    if gpus_per_task < 0:
        raise ClusterError(f"--gpus-per-task must not be negative (got {gpus_per_task:g})")

    def run(groups, bar) -> list[list]:
        connect(address, num_cpus=num_cpus)
        import ray

        if gpus_per_task > ray.cluster_resources().get("GPU", 0.0):
            raise ClusterError(f"--gpus-per-task {gpus_per_task:g}: the cluster has "
                               f"{ray.cluster_resources().get('GPU', 0.0):g} GPU")
        remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=3)(_call)
        out: list[list] = [None] * len(groups)
        live: list[tuple[int, list]] = []  # (group index, refs) whose features are in the store

        def collect(i: int, refs: list) -> None:
            try:
                out[i] = ray.get(refs)
            except ray.exceptions.RayTaskError as exc:
                reraise_user_error(exc)
                raise ClusterError(f"a probe search failed on a worker: {str(exc).strip().splitlines()[-1]}") from None
            bar.update(len(refs))

        try:
            for i, (load, calls) in enumerate(groups):
                if len(live) >= GROUPS_IN_STORE:
                    collect(*live.pop(0))
                X = ray.put(load())
                live.append((i, [remote.remote(X, fn, args) for fn, args in calls]))
            while live:
                collect(*live.pop(0))
        finally:
            for _, refs in live:
                for ref in refs:
                    ray.cancel(ref)
        return out

    return run
