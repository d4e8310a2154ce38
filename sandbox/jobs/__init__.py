"""Jobs: buyer code submitted against a contract, run by the worker, released by policy."""
