"""What audit-before-release costs a notebook output: the time from queuing its audit event to its commit,
which is how long the bridge now holds the output (review 11.12).

    python bench/audit_commit.py [--database-url postgresql+psycopg://...] [--repeats 200]

Prints, for one output at a time and for bursts of outputs, the median and 95th percentile wait and the
commits a burst took (group commit: a burst shares commits). Before this change an output was relayed at
once and its event committed up to 0.25 s later.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.notebooks.jupyter.runtime import Runtime
from sandbox.notebooks.spec import SessionSpec


def runtime_for(home: Path, database_url: str | None) -> Runtime:
    spec = SessionSpec(job="j-bench", org="acme", contract="c-bench", dataset="none", version=1, tier="trusted",
                       policy="default@1", image_id="", base_url="/notebooks/j-bench/", socket="", internal_token="",
                       workspace=str(home / "session" / "workspace"), code_dir="", data_file="",
                       kernel_root=str(home / "kernels"),
                       settings={"home": str(home), "database_url": database_url, "log_json": True})
    return Runtime(spec)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        settings = Settings(home=home, database_url=args.database_url, log_json=True)
        init_instance(settings)
        instance = Instance(settings)
        rt = runtime_for(home, args.database_url)
        details = {"msg_type": "stream", "channel": "iopub", "sha256": "0" * 64, "size": 120, "cell": "c"}
        single = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            rt.record_before_release("notebook.output", **details).result(timeout=30)
            single.append(time.perf_counter() - started)
        lines_before = len(settings.audit_checkpoint_path.read_text().splitlines())
        first, last = [], []
        for _ in range(max(1, args.repeats // args.burst)):
            started = time.perf_counter()
            gates = [rt.record_before_release("notebook.output", **details) for _ in range(args.burst)]
            gates[0].result(timeout=30)
            first.append(time.perf_counter() - started)
            gates[-1].result(timeout=30)
            last.append(time.perf_counter() - started)
        commits = len(settings.audit_checkpoint_path.read_text().splitlines()) - lines_before
        rt.close()
        instance.close()
    store = "PostgreSQL" if args.database_url else "SQLite (WAL)"
    ms = 1000.0
    print(f"store: {store}; {args.repeats} single outputs, {len(first)} bursts of {args.burst}")
    print(f"one output at a time: median {statistics.median(single) * ms:.2f} ms, "
          f"p95 {percentile(single, 0.95) * ms:.2f} ms, max {max(single) * ms:.2f} ms")
    print(f"burst of {args.burst}: first output released after median {statistics.median(first) * ms:.2f} ms, "
          f"last after median {statistics.median(last) * ms:.2f} ms (p95 {percentile(last, 0.95) * ms:.2f} ms)")
    print(f"commits for {len(first) * args.burst} burst outputs: {commits} "
          f"({len(first) * args.burst / max(commits, 1):.1f} outputs per commit)")


if __name__ == "__main__":
    main()
