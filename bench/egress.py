"""Leak-scan throughput against a 10M-row fingerprint index, side by side with raw tokenisers.

Run: .venv/bin/python bench/egress.py [--rows 10000000] [--sample-rows 1000000] [--repeats 7] [--baseline REV]
The demo registry at --rows procedures is generated once and cached under .cache/bench/, with its leak
index (the index build time is measured when it is built and remembered beside it; an index of an older
format is rebuilt). Outputs scanned,
all made from --sample-rows rows of the registry with DuckDB, so most of their bytes are real hits:
- CSV (`COPY ... (FORMAT csv)`), JSON lines (`FORMAT json`), and a pretty JSON array of records;
- an aggregate CSV and pretty JSON (a crosstab by every categorical column with means, cells under 10 rows
  suppressed), what legitimate jobs write: about 32 MiB of distinct tables, each over its own slice of the whole
  registry with its own rounding, so no block repeats and no cache sees the same bytes twice.
For each: `FingerprintIndex.scan`, its tokeniser alone (tokens found, canonicalised and hashed, nothing looked up;
numba-compiled when numba is installed), and two raw baselines over the same bytes in the same run, a plain
`re.finditer` tokeniser (matches counted, nothing hashed or looked up) and `bytes.count(b"\\n")`.
Everything runs in this one process on one core (numpy's element-wise kernels do not multithread). Each scan is
timed --repeats times and printed as the median with its p10-p90 spread, so a difference smaller than the spread
is no difference (the load average is printed beside it). With --baseline REV, the scanner of that git revision
(its own index, cached beside) scans the same bytes in the same run, its repeats interleaved with the current
scanner's, and the two columns are directly comparable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.demo import CARD, generate_registry  # noqa: E402
from sandbox.egress import leaks  # noqa: E402

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


def index(rows: int, parquet: Path, scanner: ModuleType = leaks, label: str = "") -> tuple[Any, float, int]:
    """The scanner module's index of the registry, built once and cached (per format, and per baseline label)."""
    path = CACHE / f"leak-index-{rows}{label}-f{scanner.INDEX_FORMAT}.npz"
    timing = path.with_suffix(".build.json")
    if not path.exists() or not timing.exists() or stored_format(path) != scanner.INDEX_FORMAT:
        started = time.perf_counter()
        scanner.FingerprintIndex.build(parquet, CARD, path)
        timing.write_text(json.dumps({"build_s": time.perf_counter() - started}))
    started = time.perf_counter()
    loaded = scanner.FingerprintIndex.load(path)
    print(f"index{label} loaded in {time.perf_counter() - started:.2f} s", flush=True)
    return loaded, float(json.loads(timing.read_text())["build_s"]), path.stat().st_size


def baseline_scanner(revision: str) -> ModuleType:
    """sandbox/egress/leaks.py as it was at `revision`, imported from a copy under the cache."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:sandbox/egress/leaks.py"], check=True,
                            capture_output=True).stdout
    path = CACHE / f"leaks_{revision.replace('/', '_')}.py"
    if not path.exists() or path.read_bytes() != source:
        path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"leaks_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    # Distinct aggregate tables, each the crosstab a job would write from its own sample of about 1M rows: the
    # registry is cut into 997 slices (rowid modulo 997) once, and each table sums the cells of 100 slices drawn
    # at random, means rounded to 2, 3 or 4 digits by table, cells under 10 rows suppressed; tables are added until
    # about 32 MiB of each format, so no block repeats and no cache sees the same bytes twice.
    connection.execute("CREATE TABLE everything AS SELECT * FROM read_parquet(?)", [str(parquet)])
    fine = connection.execute(
        "SELECT rowid % 997 AS slice, sex, site, stent_type, embolic_protection, symptomatic, count(*), sum(age), "
        "sum(stenosis_pct), sum(length_of_stay) FROM everything GROUP BY ALL").fetchall()
    cells = sorted({record[1:6] for record in fine})
    cell_of = {cell: number for number, cell in enumerate(cells)}
    sums = np.zeros((4, 997, len(cells)))
    for record in fine:
        sums[:, record[0], cell_of[record[1:6]]] = record[6:]
    names = ["sex", "site", "stent_type", "embolic_protection", "symptomatic", "n", "age", "stenosis", "stay"]
    rng = np.random.default_rng(11)
    csv_blocks: list[bytes] = []
    json_blocks: list[bytes] = []
    csv_size = json_size = 0
    while min(csv_size, json_size) < 32 << 20:
        totals = sums[:, rng.choice(997, size=100, replace=False), :].sum(axis=1)
        digits = 2 + len(csv_blocks) % 3
        records = [[*cell, int(totals[0, c]), *(round(float(totals[k, c] / totals[0, c]), digits) for k in (1, 2, 3))]
                   for c, cell in enumerate(cells) if totals[0, c] >= 10]
        if csv_size < 32 << 20:
            csv_blocks.append(("\n".join([",".join(names)] + [",".join(map(str, r)) for r in records]) + "\n").encode())
            csv_size += len(csv_blocks[-1])
        if json_size < 32 << 20:
            json_blocks.append(json.dumps([dict(zip(names, map(str, r), strict=True)) for r in records],
                                          indent=2).encode())
            json_size += len(json_blocks[-1])
    made["aggregate-csv"] = b"".join(csv_blocks)
    made["aggregate-json"] = b"\n".join(json_blocks)
    return made


def best(seconds: Callable[[], float], repeats: int) -> float:
    return min(seconds() for _ in range(repeats))


def spread(megabytes: float, seconds: list[float]) -> str:
    """Throughput as median [p10-p90] MB/s over the repeats."""
    rates = sorted(megabytes / s for s in seconds)
    low, high = rates[int(0.1 * (len(rates) - 1))], rates[math.ceil(0.9 * (len(rates) - 1))]
    return f"{statistics.median(rates):.0f} [{low:.0f}-{high:.0f}]"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--sample-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", help="a git revision whose scanner runs beside the current one")
    args = parser.parse_args()

    parquet = registry(args.rows)
    loaded, build_s, size = index(args.rows, parquet)
    baseline = None
    if args.baseline:
        baseline, baseline_build_s, _ = index(args.rows, parquet, baseline_scanner(args.baseline), f"-{args.baseline}")
        print(f"baseline {args.baseline}: index built in {baseline_build_s:.1f} s", flush=True)
    print(f"index: {args.rows:,} rows, file {size / 2**20:.0f} MiB, in memory {loaded.size_bytes / 2**20:.0f} MiB "
          f"of hashes, built in {build_s:.1f} s", flush=True)
    print(f"tokeniser: {'numba ' + version('numba') if leaks._compiled_tokens is not None else 'numpy'}; "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)
    before = f"{args.baseline} MB/s" if baseline else ""
    print(f"{'output':<14} {'MB':>7} {'scan MB/s [p10-p90]':>20} {before:>20} {'tokenise':>9} {'re.finditer':>12} "
          f"{'bytes.count':>12}  found")
    for name, data in outputs(parquet, args.sample_rows).items():
        megabytes = len(data) / 1e6
        scan_times: list[float] = []
        baseline_times: list[float] = []
        for _ in range(args.repeats):  # interleaved, so load that comes and goes falls on both alike
            scan_times.append(timed(lambda data=data: loaded.scan(data)))  # type: ignore[misc]
            if baseline is not None:
                baseline_times.append(timed(lambda data=data: baseline.scan(data)))  # type: ignore[misc,union-attr]
        tokenise_s = best(lambda data=data: timed(lambda: [leaks._token_hashes(chunk, loaded._keys)  # type: ignore[misc]
                                                          for _, chunk in leaks._chunks(data)]), args.repeats)
        regex_s = best(lambda data=data: timed(lambda: sum(1 for _ in TOKEN.finditer(data))), 1)  # type: ignore[misc]
        count_s = best(lambda data=data: timed(lambda: data.count(b"\n")), args.repeats)  # type: ignore[misc]
        report = loaded.scan(data)
        before = spread(megabytes, baseline_times) if baseline_times else ""
        print(f"{name:<14} {megabytes:>7.1f} {spread(megabytes, scan_times):>20} {before:>20} "
              f"{megabytes / tokenise_s:>9.0f} {megabytes / regex_s:>12.0f} {megabytes / count_s:>12.0f}  "
              f"rows={report.rows:,} ids={report.ids:,} runs={report.value_runs:,} partial={report.partial_rows:,}",
              flush=True)


if __name__ == "__main__":
    main()
