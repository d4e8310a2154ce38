"""Imaging: registering a DICOM collection in place, against dicognito and deid, and a training job reading it from
the read-only mount, against the same reads on the host.

Run: .venv/bin/python bench/imaging.py [--quick] [--files 10000] [--size 64] [--deid-sample 500] [--repeats 3]

Measured in one run, on a synthetic retinal collection written first with `sandbox.demo_imaging.write_collection`
(8-bit ophthalmic photographs of `--size` x `--size` pixels, 10 per patient, clean PS3.15 headers) in a temporary
directory:
- (1) registration, in files per second per core:
  - ours: `sandbox.catalog.collections.build_manifest`, what registering a version by reference runs: walk the
    folder, hash every file, read its header with pydicom, check it against the PS3.15 Basic Profile
    (`sandbox.catalog.dicom_deid`, deid's pixel filters included), join the labels table by patient and write
    the manifest Parquet. Timed on one thread (the per-core figure compared below) and on one thread per CPU;
  - dicognito 0.19 on one thread: `pydicom.dcmread` then `Anonymizer.anonymize` of each file in memory, nothing
    written (it rewrites every identifying element, where we only read and judge them);
  - deid 0.4 on one thread: `deid.dicom.get_identifiers` over a sample of `--deid-sample` files (it is about ten
    times slower per file than either; its rate comes from the sample).
- (2) data loading: a job container (the `sandbox-analysis` image, the runner's hardening, one CPU) with the
  collection bind-mounted read-only at /data/retina/files and its manifest at /data/retina/manifest.parquet,
  as a job sees a files dataset, reads every file of the manifest with pydicom and decodes its pixels; the same
  script runs on the host with this venv's Python over the same folder. Both read from the page cache (the
  files are read once before the clock starts); the two take turns `--repeats` times and the median is shown.
  Files/s and MB/s (file bytes read); the target is at least 0.9x the host's rate. The host side runs Debian's
  /usr/bin/python3.11 (3.11.2, the image's interpreter) with this venv's packages (pydicom 3.0.2, numpy 2.4.6,
  as in the image), where it exists: the venv's own CPython 3.11.7 is a separate build. Each side prints its
  versions. Rates are shown by wall time and by the reader's CPU time (user + system, page-cache copies included):
  on a machine shared with other work the CPU time is the steadier measure of what the mount costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import docker
import docker.types
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runners.images import image_digest  # noqa: E402
from sandbox.catalog.cards import DatasetCard  # noqa: E402
from sandbox.catalog.collections import build_manifest  # noqa: E402
from sandbox.demo_imaging import PSEUDONYM_PATTERN, labels_rows, write_collection  # noqa: E402

IMAGES_PER_PATIENT = 10
DEBIAN_PYTHON = "/usr/bin/python3.11"
HOSPITAL = "north"
DATASET = "retina"
# The runner's hardening (runners/docker.py container_options), as docker-py arguments, less the mounts.
JOB_OPTIONS = {"network_mode": "none", "read_only": True, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
               "user": "10001:10001", "init": True, "pids_limit": 256, "mem_limit": 1024 * 2**20,
               "memswap_limit": 1024 * 2**20, "nano_cpus": 10**9,
               "tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=64m,mode=1777"},
               "log_config": docker.types.LogConfig(type="json-file", config={"max-size": "1m"})}
# What a training job's data loader does with each file: read it and decode the pixels. One JSON line out.
READER = """\
import json, os, sys, time, platform
import numpy, pyarrow.parquet as pq, pydicom
root = sys.argv[1]
paths = pq.read_table(os.path.join(root, "manifest.parquet"), columns=["path"]).column("path").to_pylist()
started, cpu_started = time.perf_counter(), time.process_time()
pixels = size = 0
for path in paths:
    full = os.path.join(root, "files", path)
    size += os.path.getsize(full)
    pixels += int(pydicom.dcmread(full).pixel_array.sum() > 0)
seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
print(json.dumps({"files": len(paths), "bytes": size, "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "nonblank": pixels,
                  "python": platform.python_version(), "pydicom": pydicom.__version__, "numpy": numpy.__version__}))
"""


def bench_card() -> DatasetCard:
    return DatasetCard.model_validate({
        "name": "retina-bench", "title": "Synthetic retinal photographs", "kind": "files",
        "privacy_unit": "patient_id",
        "columns": {"patient_id": {"type": "string"}, "modality": {"type": "string", "public": True},
                    "label": {"type": "integer"}},
        "collection": {"pseudonym_pattern": PSEUDONYM_PATTERN,
                       "labels": {"dataset": "retina-labels", "on": "patient_id", "columns": ["label"]}}})


def rate(files: int, seconds: float) -> str:
    return f"{seconds:6.1f} s, {files / seconds:8,.0f} files/s"


def registration(root: Path, directory: Path, files: list[Path], patients: int, deid_sample: int) -> None:
    card = bench_card()
    labels = directory / "labels.parquet"
    pq.write_table(pa.Table.from_pylist(labels_rows(hospital=HOSPITAL, patients=patients)), labels)
    cpus = os.cpu_count() or 1
    # Imports, deid's recipe and pydicom's dictionaries are loaded once per process, before any clock starts.
    warm = write_collection(directory / "warm-up", hospital=HOSPITAL, patients=1, images_per_patient=2)
    build_manifest(directory / "warm-up", card, directory / "warm-up.parquet", labels=labels, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deid imports a module pydicom 3 deprecates
        from deid.dicom import get_identifiers
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="bench")
    anonymizer.anonymize(pydicom.dcmread(warm[0]))
    get_identifiers([str(warm[0])])
    ours: dict[int, float] = {}
    for threads in (1, cpus):
        started = time.perf_counter()
        built = build_manifest(root, card, directory / f"manifest-{threads}.parquet", labels=labels, threads=threads)
        ours[threads] = time.perf_counter() - started
        assert built.files == len(files), f"the manifest lists {built.files} of {len(files)} files"
        findings = (built.dicom or {}).get("findings") or []
        print(f"    ours, {threads} thread(s):       {rate(len(files), ours[threads])}, "
              f"{len(files) / ours[threads] / threads:6,.0f} files/s per core; header findings: {len(findings)}")
    (directory / "manifest-1.parquet").rename(directory / "manifest.parquet")

    started = time.perf_counter()
    for path in files:
        anonymizer.anonymize(pydicom.dcmread(path))
    dicognito_s = time.perf_counter() - started
    print(f"    dicognito, 1 thread:         {rate(len(files), dicognito_s)} (read + anonymize in memory)")

    sample = [str(path) for path in files[:deid_sample]]
    started = time.perf_counter()
    identifiers = get_identifiers(sample)
    deid_s = time.perf_counter() - started
    assert len(identifiers) == len(sample)
    print(f"    deid get_identifiers, 1 thread: {rate(len(sample), deid_s)} (on {len(sample):,} of the files)")

    ours_rate = len(files) / ours[1]
    print(f"  per core: ours {ours_rate:,.0f} files/s = {ours_rate / (len(files) / dicognito_s):.2f}x dicognito's, "
          f"{ours_rate / (len(sample) / deid_s):.1f}x deid's")


def loading(root: Path, directory: Path, repeats: int, host_python: str) -> None:
    code = directory / "code"
    code.mkdir()
    (code / "read.py").write_text(READER)
    mounted = directory / "mounted"
    (mounted / DATASET).mkdir(parents=True)
    for path in (directory, code, mounted, mounted / DATASET):
        path.chmod(0o755)  # the job runs as uid 10001
    (directory / "manifest.parquet").chmod(0o644)
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    engine = docker.from_env()
    image = image_digest("analysis")
    mounts = [docker.types.Mount(target="/code", source=str(code), type="bind", read_only=True),
              docker.types.Mount(target=f"/data/{DATASET}/files", source=str(root), type="bind", read_only=True),
              docker.types.Mount(target=f"/data/{DATASET}/manifest.parquet",
                                 source=str(directory / "manifest.parquet"), type="bind", read_only=True)]
    host_root = directory / "host-view"
    host_root.mkdir()
    (host_root / "files").symlink_to(root)
    (host_root / "manifest.parquet").symlink_to(directory / "manifest.parquet")

    def in_container() -> dict[str, Any]:
        container = engine.containers.create(image, ["python", "/code/read.py", f"/data/{DATASET}"], mounts=mounts,
                                             **JOB_OPTIONS)
        try:
            container.start()
            status = container.wait()["StatusCode"]
            output = container.logs(stdout=True, stderr=True).decode()
            assert status == 0, f"the reader failed in the container: {output[-2000:]}"
            result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
            return result
        finally:
            container.remove(force=True)

    # The image's CPython is Debian bookworm's; the host's own build of the same release, given this venv's
    # packages, makes the comparison one of mounts, not of interpreters.
    site_packages = next(Path(sys.prefix).glob("lib/python3.*/site-packages"))
    environment = {**os.environ, "PYTHONPATH": str(site_packages)}

    def on_host() -> dict[str, Any]:
        done = subprocess.run([host_python, str(code / "read.py"), str(host_root)], capture_output=True, text=True,
                              check=True, env=environment)
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    for path in root.rglob("*.dcm"):  # into the page cache, for both sides alike
        path.read_bytes()
    runs: dict[str, list[dict[str, Any]]] = {"host": [], "container": []}
    sides = {"host": on_host, "container": in_container}
    for round_number in range(repeats):
        order = ["host", "container"] if round_number % 2 == 0 else ["container", "host"]
        for side in order:
            runs[side].append(sides[side]())
    medians: dict[str, dict[str, float]] = {}
    for side, results in runs.items():
        first = results[0]
        assert first["nonblank"] == first["files"], "a file decoded to blank pixels"
        medians[side] = {clock: statistics.median(result[clock] for result in results)
                         for clock in ("seconds", "cpu_seconds")}
        each = ", ".join(f"{result['seconds']:.2f}" for result in results)
        print(f"    {side:9}: wall {first['files'] / medians[side]['seconds']:7,.0f} files/s, "
              f"{first['bytes'] / medians[side]['seconds'] / 1e6:5.1f} MB/s (median of {len(results)}: {each} s); "
              f"CPU {first['files'] / medians[side]['cpu_seconds']:7,.0f} files/s, "
              f"{first['bytes'] / medians[side]['cpu_seconds'] / 1e6:5.1f} MB/s; Python {first['python']}, "
              f"pydicom {first['pydicom']}, numpy {first['numpy']}")
    for clock, label in (("seconds", "wall time"), ("cpu_seconds", "CPU time")):
        ratio = medians["host"][clock] / medians["container"][clock]
        print(f"  container / host by {label}: {ratio:.2f}x (target >= 0.9x): {'met' if ratio >= 0.9 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 files")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--deid-sample", type=int, default=500, help="files deid's get_identifiers reads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host-python", default=DEBIAN_PYTHON if Path(DEBIAN_PYTHON).exists() else sys.executable,
                        help="the interpreter of the host side (default: Debian's, as in the image)")
    args = parser.parse_args()
    count = 1000 if args.quick else args.files
    patients = max(1, count // IMAGES_PER_PATIENT)
    print(f"{patients * IMAGES_PER_PATIENT:,} DICOM files of {args.size}x{args.size} pixels, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-imaging-") as tmp:
        directory = Path(tmp)
        root = directory / "pacs"
        started = time.perf_counter()
        files = write_collection(root, hospital=HOSPITAL, patients=patients, images_per_patient=IMAGES_PER_PATIENT,
                                 size=(args.size, args.size))
        megabytes = sum(path.stat().st_size for path in files) / 1e6
        print(f"collection written in {time.perf_counter() - started:.1f} s: {megabytes:,.1f} MB")
        print("\n(1) registration of the collection in place")
        registration(root, directory, files, patients, min(args.deid_sample, len(files)))
        print("\n(2) a job reading every file (pydicom, pixels decoded): read-only mount vs the host")
        loading(root, directory, args.repeats, args.host_python)


if __name__ == "__main__":
    main()
