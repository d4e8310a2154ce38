"""Training on licensed data: the platform's side of `training` and `dp_training` jobs.

`spec` checks a training request against the dataset's card and fixes how rows become numbers;
`data` turns a version into those numbers (bounded per privacy unit) and splits free-form training
rows from held-out rows by unit; `budget` holds and settles a DP training run's epsilon on the
contract's ledger; `record` checks and signs what the platform's trainer wrote; `gate` runs the
membership-inference gate over a free-form job's model files in a platform container.
"""
