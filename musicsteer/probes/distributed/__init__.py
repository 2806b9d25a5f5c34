"""The probe pipeline on Ray: `probes extract | dataset | train --engine ray`.

`cluster` connects (or starts a local Ray) and turns Ray's failures into one-line
errors; `extract_ray`, `dataset_ray` and `train_ray` run the three stages' work units
as Ray actors and tasks, while the driver stays the only writer of what lands on disk.
Nothing here is imported unless `--engine ray` is asked for: Ray is an optional extra
(`pip install 'musicsteer[ray]'`).
"""
