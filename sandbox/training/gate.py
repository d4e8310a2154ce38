"""The membership-inference gate's run: the job's model files, the training rows and the held-out rows in a
platform container (`sandbox_trainer.gate` in the training image), never with the buyer's code.

The container gets the models as copies under /code/models, the two splits read-only under /data, and
writes one report; nothing else of it is kept. Its numbers become checks under the policy's thresholds
(`sandbox.egress.models.gate_checks`) in the worker.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from runners.base import JobDefinition, JobRunner, Resources, RunState
from sandbox.training.spec import GATE_COMMAND

GATE_SUFFIX = ".gate"
REPORT_FILE = "report.json"
MAX_REPORT_BYTES = 4 * 1024 * 1024
GATE_RESOURCES = Resources(cpus=1.0, memory_mb=4096, timeout_s=900, output_mb=16, tmp_mb=512)


class GateFailed(RuntimeError):
    """The gate produced no usable report."""


def gate_id(job_id: str) -> str:
    """The gate's container id: the job's, so the worker knows whose it is (`job_of`)."""
    return f"{job_id}{GATE_SUFFIX}"


def job_of(runner_id: str) -> str:
    """The job a runner id belongs to: itself, or the job whose gate it is."""
    return runner_id.removesuffix(GATE_SUFFIX)


def run_gate(runner: JobRunner, *, job_id: str, org: str, image_id: str, models: dict[str, Path],
             train: Path, holdout: Path, label: str | None, features: list[str], task: str, scratch: Path,
             poll_s: float = 0.5) -> dict[str, Any]:
    """Run the gate over `models` (output path -> stored file); each output path's report entry.

    Blocks until the container exits (at most GATE_RESOURCES.timeout_s, which the runner enforces).
    """
    identifier = gate_id(job_id)
    code = scratch / "code"
    shutil.rmtree(scratch, ignore_errors=True)
    (code / "models").mkdir(parents=True)
    names = {}
    for number, (path, stored) in enumerate(sorted(models.items())):
        name = f"models/{number:03d}{Path(path).suffix.lower()}"
        shutil.copyfile(stored, code / name)
        names[name] = path
    (code / "gate.json").write_text(json.dumps({"label": label, "features": features, "task": task,
                                                "models": sorted(names)}))
    definition = JobDefinition(id=identifier, org=org, image=image_id, command=list(GATE_COMMAND), code_dir=code,
                               data_files={"train.parquet": train, "holdout.parquet": holdout},
                               resources=GATE_RESOURCES)
    runner.cleanup(identifier)  # a gate left by a worker that died mid-run starts again from scratch
    try:
        runner.prepare(definition)
        runner.start(definition)
        while runner.poll(identifier).state not in (RunState.EXITED, RunState.UNKNOWN):
            time.sleep(poll_s)
        status = runner.poll(identifier)
        collected = runner.collect(identifier, scratch / "out")
    finally:
        runner.cleanup(identifier)
    report = next((f for f in collected.files if f.path == REPORT_FILE), None)
    if report is None or report.size > MAX_REPORT_BYTES:
        tail = collected.stderr.stored_at.read_bytes()[-2000:].decode(errors="replace")
        raise GateFailed(f"the gate wrote no report (exit code {status.exit_code}, timed out: {status.timed_out}, "
                         f"out of memory: {status.oom_killed}): {tail}")
    try:
        document = json.loads(report.stored_at.read_bytes())
        entries = document["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GateFailed("the gate's report is not the JSON it writes") from exc
    if not isinstance(entries, dict):
        raise GateFailed("the gate's report lists no models")
    return {path: entries.get(name) for name, path in names.items()}
