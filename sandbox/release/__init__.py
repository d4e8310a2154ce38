"""The one way out: every file that may leave (job outputs, logs, notebook exports and withheld
notebook outputs, later models) goes through this package.

- `status`: the output status and its transition table.
- `tables`: verified tables, which the platform recomputes from the dataset version, checks and
  writes itself; the only buyer-requested content that leaves the `aggregate` tier without a person.
- `routing`: what each file's checks add up to, tier by tier: release, review or block.
- `verify`: the client side, checking a signed manifest and the files it names.
"""
