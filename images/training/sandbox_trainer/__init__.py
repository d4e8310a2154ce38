"""The training image's platform code: it runs inside `sandbox-training` containers, never on the host.

- `run`: the DP-SGD trainer of `dp_training` jobs (PID 1); `export` is the child that runs the buyer's
  `model.py` before any data is present; `graph` reads that child's export as hostile input; `dpsgd` is the
  training itself; `spec` the job's training spec.
- `gate`, `weights`, `models`: the membership-inference gate for model files that jobs write.
"""
