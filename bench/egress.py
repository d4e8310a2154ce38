"""Leak-scan throughput against a 10M-row fingerprint index, side by side with raw tokenisers.

Run: .venv/bin/python bench/egress.py [--rows 10000000] [--sample-rows 1000000] [--repeats 5]
The demo registry at --rows procedures is generated once and cached under .cache/bench/, with its leak
index (the index build time is measured when it is built and remembered beside it; an index of an older
format is rebuilt). Outputs scanned,
all made from --sample-rows rows of the registry with DuckDB, so most of their bytes are real hits:
- CSV (`COPY ... (FORMAT csv)`), JSON lines (`FORMAT json`), and a pretty JSON array of records;
- an aggregate CSV and pretty JSON (a crosstab by every categorical column with means), what legitimate
  jobs write, repeated to about 32 MiB.
For each: `FingerprintIndex.scan`, its tokeniser alone (tokens found, canonicalised and hashed, nothing looked up;
numba-compiled when numba is installed), and two raw baselines over the same bytes in the same run, a plain
`re.finditer` tokeniser (matches counted, nothing hashed or looked up) and `bytes.count(b"\\n")`.
Everything runs in this one process on one core (numpy's element-wise kernels do not multithread). Each time is
the best of --repeats runs: on a shared machine, other load only ever adds time, so the fastest run is the
closest to the code's own cost (the load average is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.demo import CARD, generate_registry  # noqa: E402
from sandbox.egress import leaks  # noqa: E402
from sandbox.egress.leaks import FingerprintIndex  # noqa: E402

CACHE = REPO / ".cache" / "bench"
TOKEN = re.compile(rb"[A-Za-z0-9_.+\-]+")


def registry(rows: int) -> Path:
    path = CACHE / f"leak-registry-{rows}.parquet"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # The demo generator draws at most 900,000 patients, so larger registries are made of 1M-row blocks,
        # each block's ids prefixed with its number to keep patients distinct.
        block = min(rows, 1_000_000)
        writer: pq.ParquetWriter | None = None
        for number in range(math.ceil(rows / block)):
            table = generate_registry(min(block, rows - number * block), seed=7 + number)
            ids = pc.utf8_replace_slice(table.column("patient_id"), start=0, stop=1, replacement=f"P{number:02d}")
            table = table.set_column(0, "patient_id", ids)
            writer = writer or pq.ParquetWriter(path.with_suffix(".tmp"), table.schema)
            writer.write_table(table)
        assert writer is not None
        writer.close()
        path.with_suffix(".tmp").rename(path)
        print(f"generated {rows:,}-row registry in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def index(rows: int, parquet: Path) -> tuple[FingerprintIndex, float, int]:
    path = CACHE / f"leak-index-{rows}.npz"
    timing = path.with_suffix(".build.json")
    if not path.exists() or not timing.exists() or stored_format(path) != leaks.INDEX_FORMAT:
        started = time.perf_counter()
        FingerprintIndex.build(parquet, CARD, path)
        timing.write_text(json.dumps({"build_s": time.perf_counter() - started}))
    started = time.perf_counter()
    loaded = FingerprintIndex.load(path)
    print(f"index loaded in {time.perf_counter() - started:.2f} s", flush=True)
    return loaded, float(json.loads(timing.read_text())["build_s"]), path.stat().st_size


def stored_format(path: Path) -> int | None:
    """The format of a cached index, so one written by an older version of the scanner is rebuilt."""
    with np.load(path, allow_pickle=False) as stored:
        header: dict[str, int] = json.loads(bytes(stored["header"]).decode())
    return header.get("format")


def outputs(parquet: Path, sample_rows: int) -> dict[str, bytes]:
    connection = duckdb.connect()
    connection.execute("CREATE TABLE sample AS SELECT * FROM read_parquet(?) LIMIT ?", [str(parquet), sample_rows])
    made: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, options in (("csv", "FORMAT csv, HEADER true"), ("jsonl", "FORMAT json")):
            target = Path(folder) / name
            connection.execute(f"COPY sample TO '{target}' ({options})")
            made[name] = target.read_bytes()
    records = connection.execute("SELECT * FROM sample").fetchall()
    names = [column[0] for column in connection.description or []]
    made["pretty-json"] = json.dumps([dict(zip(names, record, strict=True)) for record in records[:200_000]],
                                     indent=2).encode()
    aggregate = connection.execute(
        "SELECT sex, site, stent_type, embolic_protection, symptomatic, count(*) AS n, round(avg(age), 2) AS age, "
        "round(avg(stenosis_pct), 2) AS stenosis, round(avg(length_of_stay), 3) AS stay "
        "FROM sample GROUP BY ALL ORDER BY ALL").fetchall()
    lines = ["sex,site,stent_type,embolic_protection,symptomatic,n,age,stenosis,stay"]
    lines += [",".join(map(str, record)) for record in aggregate]
    block = ("\n".join(lines) + "\n").encode()
    made["aggregate-csv"] = block * max(1, (32 << 20) // len(block))
    names = lines[0].split(",")
    pretty = json.dumps([dict(zip(names, map(str, record), strict=True)) for record in aggregate], indent=2).encode()
    made["aggregate-json"] = pretty * max(1, (32 << 20) // len(pretty))
    return made


def best(seconds: Callable[[], float], repeats: int) -> float:
    return min(seconds() for _ in range(repeats))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--sample-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    parquet = registry(args.rows)
    loaded, build_s, size = index(args.rows, parquet)
    print(f"index: {args.rows:,} rows, file {size / 2**20:.0f} MiB, in memory {loaded.size_bytes / 2**20:.0f} MiB "
          f"of hashes, built in {build_s:.1f} s", flush=True)
    print(f"tokeniser: {'numba ' + version('numba') if leaks._compiled_tokens is not None else 'numpy'}; "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)
    print(f"{'output':<14} {'MB':>7} {'scan MB/s':>10} {'tokenise':>9} {'re.finditer':>12} {'bytes.count':>12}  found")
    for name, data in outputs(parquet, args.sample_rows).items():
        megabytes = len(data) / 1e6
        scan_s = best(lambda data=data: timed(lambda: loaded.scan(data)), args.repeats)  # type: ignore[misc]
        tokenise_s = best(lambda data=data: timed(lambda: [leaks._token_hashes(chunk, loaded._keys)  # type: ignore[misc]
                                                          for _, chunk in leaks._chunks(data)]), args.repeats)
        regex_s = best(lambda data=data: timed(lambda: sum(1 for _ in TOKEN.finditer(data))), 1)  # type: ignore[misc]
        count_s = best(lambda data=data: timed(lambda: data.count(b"\n")), args.repeats)  # type: ignore[misc]
        report = loaded.scan(data)
        print(f"{name:<14} {megabytes:>7.1f} {megabytes / scan_s:>10.0f} {megabytes / tokenise_s:>9.0f} "
              f"{megabytes / regex_s:>12.0f} "
              f"{megabytes / count_s:>12.0f}  rows={report.rows:,} ids={report.ids:,} runs={report.value_runs:,}",
              flush=True)


if __name__ == "__main__":
    main()
