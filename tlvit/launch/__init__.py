"""Training rows as jobs: launch code, apart from the training code it runs (imported inside the job).

- `executor`: the `launcher:` section of params.yaml (typed Slurm options) and one executor factory for
  `local` (in this process), `submitit-local` (background processes) and `slurm`.
- `job`: `RowJob`, the checkpointable object a job runs (one row, every seed; DDP across the job's tasks).
- `launcher`: stale rows from `dvc status`, and `launch_rows` (one submission for all rows).
- `records`: `runs/<preset>/<row>/launch.json` and job states; `pipeline.train` waits on them.
- `status`, `cli`: `tlvit launch | status | sync`.

Nothing here imports submitit or torch at import time.
"""
