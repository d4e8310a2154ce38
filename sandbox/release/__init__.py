"""The one way out: every file that may leave (job outputs, logs, DP answers, notebook exports and
withheld notebook outputs, later models) goes through this package.

- `status`: the output status and its transition table, and who made an output's bytes.
- `routing`: what each file's checks add up to, tier by tier: release, review or block.
- `tables`: verified tables, which the platform recomputes from the dataset version, checks and
  writes itself; with DP answers (`dp_answers`), the only content that leaves the `aggregate` tier
  without a person.
- `jobs`: a finished job's release steps (split the job's files from its table requests, make the
  platform's files).
- `review`: what each caller sees, stewards' decisions, the signed manifest and the release report.
- `verify`: the client side, checking a signed manifest and the files it names.
"""
