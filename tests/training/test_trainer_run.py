"""The trainer's whole flow (`python -I -m sandbox_trainer.run`) against a stand-in worker on a Unix socket.

On the host the trainer is not PID 1, so it kills only the export child's process group, and its folders
(/code, /output, /tmp) and socket come from environment variables."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from sandbox_trainer import run
from sandbox_trainer.spec import SpecError, parse_spec
from worker_stub import WorkerStub, npz_bytes, socket_folder

from sandbox.budgets import rdp

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "images" / "training"
BUYER_CODE = Path(__file__).resolve().parent / "buyer_code"
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module('sandbox_trainer.run', run_name='__main__', alter_sys=True)")
UNITS = 200


def spec(**changes: Any) -> dict[str, Any]:
    base = {"kind": "dp_training", "dataset": "carotid-stenting", "version": 3, "model_module": "model.py",
            "features": ["age", "sex", "sbp", "ldl"], "label": "stroke_30d", "task": "classification",
            "n_features": 4, "n_outputs": 2, "epochs": 2, "batch_size": 20, "learning_rate": 0.5,
            "max_grad_norm": 1.0, "epsilon": 2.0, "delta": 1e-5, "n_units": UNITS, "max_rows_per_unit": 2}
    return {**base, **changes}


def training_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Some units with two rows, the rest with one; a label the features predict."""
    rng = np.random.default_rng(0)
    unit = np.concatenate([np.arange(UNITS), np.arange(0, UNITS, 5)])
    x = rng.normal(size=(unit.size, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64), unit.astype(np.int64)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    output: Path
    work: Path
    worker: WorkerStub


@pytest.fixture
def worker() -> Iterator[WorkerStub]:
    stub = WorkerStub(npz_bytes(*training_rows()))
    yield stub
    stub.close()


def trainer(tmp_path: Path, socket_path: Path, model_file: str, *, export_timeout_s: float = 120,
            **spec_changes: Any) -> tuple[list[str], dict[str, str]]:
    """The trainer's command line and environment, with its folders under `tmp_path` and `model_file` as model.py."""
    code, output, work = tmp_path / "code", tmp_path / "output", tmp_path / "tmp"
    for folder in (code, output, work):
        folder.mkdir()
    shutil.copy(BUYER_CODE / model_file, code / "model.py")
    (code / "socket_path.txt").write_text(str(socket_path))   # for the hostile model that looks for the socket
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SANDBOX_TRAINING": json.dumps(spec(**spec_changes)),
           "SANDBOX_TRAINER_CODE": str(code), "SANDBOX_TRAINER_OUTPUT": str(output),
           "SANDBOX_TRAINER_TMP": str(work), "SANDBOX_DP_SOCKET": str(socket_path),
           "SANDBOX_TRAINER_EXPORT_TIMEOUT_S": str(export_timeout_s)}
    return [sys.executable, "-I", "-c", BOOTSTRAP, str(PACKAGE_ROOT)], env


def train(tmp_path: Path, worker: WorkerStub, model_file: str, *, export_timeout_s: float = 120,
          wrap: list[str] | None = None, **spec_changes: Any) -> Outcome:
    command, env = trainer(tmp_path, worker.path, model_file, export_timeout_s=export_timeout_s, **spec_changes)
    done = subprocess.run([*(wrap or []), *command], env=env, capture_output=True, text=True, timeout=300)
    return Outcome(done.returncode, done.stdout, done.stderr, tmp_path / "output", tmp_path / "tmp", worker)


def test_a_run_trains_and_writes_weights_that_load_into_build_model(tmp_path: Path, worker: WorkerStub) -> None:
    outcome = train(tmp_path, worker, "tiny_mlp.py")
    assert outcome.returncode == 0, outcome.stderr
    assert sorted(os.listdir(outcome.output)) == ["model.safetensors", "training-record.json"]
    assert os.listdir(outcome.work) == [], "the export folder was not wiped"
    record = json.loads((outcome.output / "training-record.json").read_text())
    weights = (outcome.output / "model.safetensors").read_bytes()
    assert record["epsilon"] <= 2.0 and record["epsilon"] > 1.5
    assert record["steps"] == 2 * 10 and record["sample_rate"] == pytest.approx(0.1)
    assert record["noise_multiplier"] > 0.5 and record["accountant"] == "rdp"
    # The worker recomputes the epsilon from the record with its own accountant: the two agree.
    assert rdp.epsilon(record["noise_multiplier"], record["sample_rate"], record["steps"],
                       record["delta"]) == pytest.approx(record["epsilon"], rel=1e-6)
    assert record["code_sha256"] == hashlib.sha256((BUYER_CODE / "tiny_mlp.py").read_bytes()).hexdigest()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert {key: record[key] for key in ("dataset", "version", "features", "label", "n_units", "max_rows_per_unit",
                                         "task")} == {key: spec()[key] for key in (
        "dataset", "version", "features", "label", "n_units", "max_rows_per_unit", "task")}
    expected_keys = {"code_sha256", "dataset", "version", "epsilon", "delta", "steps", "sample_rate",
                     "noise_multiplier", "max_grad_norm", "accountant", "epochs", "batch_size", "learning_rate",
                     "n_units", "max_rows_per_unit", "features", "label", "n_features", "n_outputs", "task",
                     "weights_sha256"}
    assert set(record) == expected_keys
    sys.path.insert(0, str(BUYER_CODE))
    try:
        import tiny_mlp
    finally:
        sys.path.remove(str(BUYER_CODE))
    model = tiny_mlp.build_model(4, 2)
    model.load_state_dict(safetensors.torch.load_file(str(outcome.output / "model.safetensors")))  # strict
    assert model(torch.zeros(3, 4)).shape == (3, 2)
    assert worker.data_requests == 1
    assert worker.progress[-1] == {"step": 20, "steps": 20, "epsilon": record["epsilon"]}
    assert [post["step"] for post in worker.progress] == list(range(1, 21))
    assert "building a tiny MLP for 4 features" in outcome.stdout
    assert "before any data was in the container" in outcome.stdout


@pytest.mark.parametrize(("model_file", "message", "child_said"), [
    ("forged_from_file.py", "aten.from_file.default is not allowed", "wrote a forged graph"),
    ("mutates_buffer.py", "writes to the model's buffer memory", None),
    ("no_build_model.py", "failed (exit status 1)", "must define build_model(n_features, n_outputs)"),
])
def test_a_refused_model_is_named_and_nothing_is_trained(tmp_path: Path, worker: WorkerStub, model_file: str,
                                                         message: str, child_said: str | None) -> None:
    outcome = train(tmp_path, worker, model_file)
    assert outcome.returncode == run.EXIT_REFUSED, outcome.stderr
    assert message in outcome.stderr
    if child_said is not None:
        assert child_said in outcome.stdout   # the data reached the trainer, so the child's output is shown
    assert os.listdir(outcome.output) == [] and worker.progress == []
    assert worker.data_requests == 1, "the trainer fetches the data once, to prove the child never had it"


def test_a_model_that_takes_the_data_fails_the_run_and_its_output_is_withheld(tmp_path: Path,
                                                                              worker: WorkerStub) -> None:
    outcome = train(tmp_path, worker, "takes_data.py", export_timeout_s=10)
    assert outcome.returncode == run.EXIT_DATA_TAKEN, outcome.stderr
    assert "already been requested by another process" in outcome.stderr
    assert "STOLEN-ROWS" not in outcome.stdout + outcome.stderr, "the child's output (with the data) was shown"
    assert outcome.stdout == ""
    assert worker.data_requests == 2 and worker.progress == []
    assert os.listdir(outcome.output) == [] and os.listdir(outcome.work) == []


def test_a_worker_that_does_not_answer_is_waited_for(tmp_path: Path) -> None:
    """The worker restarts while the model's code runs: nothing serves the socket when the trainer asks for the
    data. It says so and waits; once a worker serves the socket again, it trains as usual."""
    folder = socket_folder()
    command, env = trainer(tmp_path, folder / "dp.sock", "tiny_mlp.py")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        assert process.stderr is not None
        said = []
        while not any("the worker does not answer" in line for line in said):
            line = process.stderr.readline()
            assert line, f"the trainer ended without waiting for the worker: {''.join(said)}"
            said.append(line)
        worker = WorkerStub(npz_bytes(*training_rows()), folder=folder)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
        if worker is not None:
            worker.close()
        else:
            shutil.rmtree(folder, ignore_errors=True)
    assert process.returncode == 0, "".join(said) + stderr
    assert "building a tiny MLP for 4 features" in stdout
    assert worker.data_requests == 1 and worker.progress[-1]["step"] == 20
    assert sorted(os.listdir(tmp_path / "output")) == ["model.safetensors", "training-record.json"]


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not unshare_works(), reason="needs unshare --pid (root or user namespaces)")
def test_as_pid_1_the_trainer_kills_what_the_models_code_left_running(tmp_path: Path, worker: WorkerStub) -> None:
    """In a PID namespace of its own, as in a container, the trainer is PID 1 and kills every other process
    before it asks for the data: when it asks, it is alone, and the detached process the model's code forked
    (which asks once the trainer has the data) never gets it. (A private tmpfs on /dev/shm, which PID 1 wipes,
    keeps the host's own.)"""
    outcome = train(tmp_path, worker, "leaves_a_daemon.py",
                    wrap=["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                          'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"])
    assert outcome.returncode == 0, outcome.stderr
    assert len(worker.askers) == 1 and worker.askers[0].neighbours == [], \
        f"processes that ran beside the trainer when it asked for the data: {worker.askers}"
    assert not (tmp_path / "daemon-ran").exists(), "a process the model's code left behind got the data"


@pytest.mark.parametrize(("changes", "field"), [
    ({"kind": "analysis"}, "kind"),
    ({"task": "clustering"}, "task"),
    ({"n_features": 5}, "features names 4 columns"),
    ({"batch_size": UNITS + 1}, "batch_size"),
    ({"epsilon": 0}, "epsilon"),
    ({"delta": 1.0}, "delta"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"epochs": True}, "epochs"),
    ({"model_module": "../etc/passwd"}, "model_module"),
    ({"n_outputs": 1}, "n_outputs"),
    ({"version": "3"}, "version"),
])
def test_a_malformed_spec_is_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_spec(json.dumps(spec(**changes)))


def test_the_spec_gives_the_sample_rate_and_steps() -> None:
    parsed = parse_spec(json.dumps(spec(epochs=3, batch_size=30)))
    assert parsed.sample_rate == pytest.approx(30 / UNITS)
    assert parsed.steps == 3 * round(UNITS / 30)


@pytest.mark.parametrize(("arrays", "why", "value"), [
    ({"X": np.zeros((3, 5), np.float32)}, "shape", "5"),
    ({"y": np.array([0, 1, 7])}, "class index", "7"),
    ({"y": np.array([0.0, 1.0, 0.5])}, "integer class", "0.5"),
    ({"unit": np.array([0, 1, 4321])}, "unit id", "4321"),
    ({"unit": np.array([0, 1])}, "one id per row", "2"),
])
def test_malformed_data_from_the_worker_is_refused_without_its_values(arrays: dict[str, np.ndarray], why: str,
                                                                      value: str) -> None:
    good = {"X": np.zeros((3, 4), np.float32), "y": np.array([0, 1, 1]), "unit": np.array([0, 1, 2])}
    good.update(arrays)
    with pytest.raises(ValueError, match=why) as refused:
        run.parse_data(npz_bytes(good["X"], good["y"], good["unit"]), parse_spec(json.dumps(spec())))
    assert value not in str(refused.value), f"the refusal shows the offending value {value}"
