"""The platform's DP-SGD trainer: the main process of a `dp_training` job's container.

    python -I -m sandbox_trainer.run        (PID 1, uid 10001, read-only root, no network, no capabilities)

The buyer sends only `model.py` with `build_model(n_features, n_outputs)`. On an image dataset (features
["image"], spec `input_shape` [channels, height, width]) each row is one image, float32 in [0, 1], and the model
takes input (rows, channels, height, width): `build_model` is then called with `input_shape=(channels, height,
width)` too if its signature accepts it (n_features is channels x height x width). Their code must never run in a
process that can see the training rows, nor influence the process that does. So:

1. This process makes itself undumpable (no same-uid ptrace, no /proc/1/mem), before anything else runs.
2. Phase 1, with no data in the container: a child (`sandbox_trainer.export`) imports the buyer's module,
   builds the model and exports its graph to a folder under /tmp. Its output is captured (64 KiB), not shown.
3. When it exits (or its time is up), every other process in the container is killed (PID 1 kills -1 and
   reaps until /proc lists no one else), the export is read into memory through a folder descriptor opened
   before the child ran, and /tmp and /output are wiped.
4. The data is fetched from the worker (`POST /training/data`), once: it serves it only once (a worker that
   does not answer, restarting, is waited for up to WORKER_WAIT_S; the request was never delivered). A 409 means
   some other process took it, which can only be the buyer's code: the run fails, and NOTHING derived from
   the child is shown (its output, its exit status, even our findings about its export could carry data),
   nor is the export even looked at (how long that takes could carry data too).
5. Only a 200 proves the child never had the data. Then the export is parsed and checked as hostile input
   (`graph.load_program`: JSON and safetensors, an allow-list of pure tensor ops, no buffer writes) and
   dry-run on random rows, the child's output is printed, and any refusal.
6. DP-SGD (`dpsgd`) on the rows, per patient; progress goes to `POST /training/progress`.
7. /output/model.safetensors (keyed like the buyer's `state_dict()`) and /output/training-record.json.

Because a 200 is the only proof, the data is fetched even when the export is refused: the refusal can then
be shown with the buyer's logs, and the rows are dropped unread. On a 409 the process waits out the export's
time limit before exiting, so a job's duration does not depend on when the buyer's code took the data. (What
still runs between the child's end and the fetch, killing, reading at most the export's size limits and
wiping what the child wrote, takes time the child influences; it is bounded by what the child could write
within its time limit.)

Exit codes: 0 trained; 1 the model was refused or failed to build; 2 bad spec or environment; 3 the data
had been taken; 4 the worker failed or sent malformed data; 5 training failed.

Host tests may override the paths with SANDBOX_TRAINER_CODE, SANDBOX_TRAINER_OUTPUT, SANDBOX_TRAINER_TMP,
SANDBOX_DP_SOCKET and the export time limit with SANDBOX_TRAINER_EXPORT_TIMEOUT_S. Only as PID 1 does
step 3 kill every process; elsewhere it kills the child's process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import io
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from sandbox_trainer import dpsgd
from sandbox_trainer.graph import (
    GRAPH_FILE,
    MAX_GRAPH_BYTES,
    MAX_TENSORS_BYTES,
    TENSORS_FILE,
    ExportRefused,
    load_program,
)
from sandbox_trainer.spec import SpecError, TrainingSpec, parse_spec

EXIT_REFUSED, EXIT_ENVIRONMENT, EXIT_DATA_TAKEN, EXIT_WORKER, EXIT_TRAINING = 1, 2, 3, 4, 5
LOG_LIMIT_BYTES = 64 * 1024
EXPORT_TIMEOUT_S = 300.0
KILL_DEADLINE_S = 10.0
PROGRESS_TIMEOUT_S = 5.0
DATA_TIMEOUT_S = 600.0
WORKER_WAIT_S = 300.0  # how long the data request waits for a worker that is not answering (restarting)
WORKER_RETRY_S = 0.5
PR_SET_DUMPABLE = 4
# The container's own tmpfs mounts (a fresh, private container: not a shared host /tmp).
CONTAINER_TMP = Path("/tmp")  # noqa: S108
CONTAINER_SHM = Path("/dev/shm")  # noqa: S108
EPSILON_SLACK = 1e-9

# The child: put the package's folder on sys.path (in the image it is site-packages already), then run
# `-m sandbox_trainer.export`. It raises its own OOM score first, so that if anything in the container must
# be killed for memory, the buyer's processes go first (best effort: buyer code could lower it again).
_BOOTSTRAP = (
    "import runpy, sys\n"
    "try:\n"
    "    open('/proc/self/oom_score_adj', 'w').write('1000')\n"
    "except OSError:\n"
    "    pass\n"
    "sys.path.insert(0, sys.argv.pop(1))\n"
    "runpy.run_module('sandbox_trainer.export', run_name='__main__', alter_sys=True)\n"
)


@dataclass(frozen=True)
class Paths:
    code: Path = Path("/code")
    output: Path = Path("/output")
    work: Path = CONTAINER_TMP
    socket: Path = Path("/run/sandbox/dp.sock")

    @classmethod
    def from_env(cls) -> Paths:
        env = os.environ
        return cls(code=Path(env.get("SANDBOX_TRAINER_CODE", "/code")),
                   output=Path(env.get("SANDBOX_TRAINER_OUTPUT", "/output")),
                   work=Path(env.get("SANDBOX_TRAINER_TMP", str(CONTAINER_TMP))),
                   socket=Path(env.get("SANDBOX_DP_SOCKET", "/run/sandbox/dp.sock")))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Process isolation ------------------------------------------------------------------------------------

def make_undumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0): no same-uid process may ptrace us or read /proc/<pid>/mem."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def is_container_init() -> bool:
    return os.getpid() == 1


@dataclass
class ChildOutcome:
    """What the export child did; shown only once the data has proven it never had the data."""

    returncode: int | None          # None: killed at its time limit
    logs: bytes
    truncated: bool
    started: float                  # time.monotonic() when it started
    deadline: float                 # when its time was up


def run_export_child(spec: TrainingSpec, paths: Paths, export_dir: Path, timeout_s: float) -> ChildOutcome:
    """Run `sandbox_trainer.export` on the buyer's module, capture its output, wait at most `timeout_s`."""
    package_root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-I", "-c", _BOOTSTRAP, str(package_root), str(paths.code), spec.model_module,
               str(spec.n_features), str(spec.n_outputs), str(export_dir)]
    if spec.is_image:
        command.append("x".join(str(size) for size in spec.row_shape))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(paths.work), "TMPDIR": str(paths.work),
           "LANG": os.environ.get("LANG", "C.UTF-8")}
    started = time.monotonic()
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             cwd=str(paths.work), env=env, start_new_session=True, close_fds=True)
    assert child.stdout is not None
    capture = _Capture(child.stdout)
    returncode: int | None
    try:
        returncode = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
    end_other_processes(child)
    capture.join(timeout=2.0)
    return ChildOutcome(returncode=returncode, logs=capture.data, truncated=capture.truncated, started=started,
                        deadline=started + timeout_s)


class _Capture:
    """Drain a pipe on a thread, keeping the first LOG_LIMIT_BYTES (the rest is read and dropped)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False
        self.thread = threading.Thread(target=self._drain, name="export-output", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            while chunk := self.pipe.read1(65536):
                room = LOG_LIMIT_BYTES - self.size
                if room > 0:
                    self.chunks.append(chunk[:room])
                    self.size += min(room, len(chunk))
                if len(chunk) > room:
                    self.truncated = True
        except (OSError, ValueError):
            pass

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():   # a process outside our reach (host tests only) holds the pipe open
            self.truncated = True

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def end_other_processes(child: subprocess.Popen[bytes]) -> None:
    """As PID 1: kill every other process in the container until /proc lists none. Otherwise (host tests):
    kill the child's process group, never anything else."""
    if not is_container_init():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return
    deadline = time.monotonic() + KILL_DEADLINE_S
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)   # from PID 1: every process in the namespace but us
        _reap()
        others = [entry for entry in os.listdir("/proc") if entry.isdigit() and entry != "1"]
        if not others:
            break
        if time.monotonic() > deadline:
            # SIGKILL is pending on each of them, so none runs user code again (one stuck in the kernel
            # may linger in /proc); carrying on is safe, and a failure here would be a signal of its own.
            break
        time.sleep(0.01)
    if child.returncode is None:
        child.returncode = -signal.SIGKILL


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# Files the child left -----------------------------------------------------------------------------------

def read_export(folder_fd: int) -> tuple[bytes, bytes]:
    """graph.json and tensors.safetensors from the export folder, by descriptor: a renamed folder, a symlink,
    a FIFO or an oversized file is refused (ValueError), never followed or waited on."""
    return (_read_regular(folder_fd, GRAPH_FILE, MAX_GRAPH_BYTES),
            _read_regular(folder_fd, TENSORS_FILE, MAX_TENSORS_BYTES))


def _read_regular(folder_fd: int, name: str, limit: int) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError as exc:
        raise ValueError(f"the export wrote no {name} ({exc.strerror})") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"{name} is not a regular file")
        if status.st_size > limit:
            raise ValueError(f"{name} is larger than {limit} bytes")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{name} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def wipe(folder: Path) -> None:
    """Remove everything inside `folder` (not the folder itself); OSError if anything is left.

    The child is dead by now, so nothing changes under us. It ran as our uid, so whatever modes it set on
    its folders, we can set them back; the walk is iterative, so a deep tree cannot exhaust the stack.
    """
    if not folder.is_dir():
        return
    pending: list[tuple[str, bool]] = [(entry.path, False) for entry in os.scandir(folder)
                                       if entry.is_dir(follow_symlinks=False)]
    for entry in os.scandir(folder):
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)
    while pending:
        path, emptied = pending.pop()
        if emptied:
            os.rmdir(path)
            continue
        os.chmod(path, 0o700)
        pending.append((path, True))
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, False))
            else:
                os.unlink(entry.path)
    left = os.listdir(folder)
    if left:
        raise OSError(f"{folder} still holds {len(left)} entries after wiping")


# The worker's socket ----------------------------------------------------------------------------------

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("sandbox", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


def connect(path: Path, timeout: float, wait_s: float = 0.0) -> _UnixConnection:
    """A connection to the worker's socket at `path`. While nothing listens there (a worker restarting serves
    it again once up) it tries again for up to `wait_s` seconds: no request was delivered, so nothing was
    served, and asking again is safe."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        connection = _UnixConnection(path, timeout)
        try:
            connection.connect()
            return connection
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
            if time.monotonic() >= deadline:
                raise
            if not told:
                say(f"the worker does not answer at {path} (restarting?): waiting up to {wait_s:.0f} s for it")
                told = True
            time.sleep(WORKER_RETRY_S)


def post(path: Path, route: str, body: dict[str, Any], timeout: float, *,
         wait_s: float = 0.0) -> tuple[int, bytes]:
    """POST JSON `body` to `route` on the Unix socket at `path`; (status, response body)."""
    connection = connect(path, timeout, wait_s)
    try:
        payload = json.dumps(body).encode()
        connection.request("POST", route, body=payload,
                           headers={"Content-Type": "application/json", "Content-Length": str(len(payload))})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class DataUnavailable(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fetch_data(path: Path) -> bytes:
    """The training rows (.npz bytes); DataUnavailable(EXIT_DATA_TAKEN) on a 409."""
    try:
        status, body = post(path, "/training/data", {}, DATA_TIMEOUT_S, wait_s=WORKER_WAIT_S)
    except (OSError, http.client.HTTPException) as exc:
        raise DataUnavailable(EXIT_WORKER, f"cannot reach the worker at {path}: {exc}") from exc
    if status == 409:
        raise DataUnavailable(EXIT_DATA_TAKEN, "the training data had already been requested by another process "
                                               "in this container before the trainer asked for it: only the "
                                               "model's code ran here, so it took the data. The run is refused "
                                               "and the model code's output is withheld.")
    if status != 200:
        detail = body[:500].decode("utf-8", "replace")
        raise DataUnavailable(EXIT_WORKER, f"the worker refused the training data ({status}): {detail}")
    return body


def post_progress(path: Path, step: int, steps: int, epsilon: float) -> None:
    """Tell the worker how far training is; a failure here never stops training."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        post(path, "/training/progress", {"step": step, "steps": steps, "epsilon": epsilon}, PROGRESS_TIMEOUT_S)


@dataclass
class TrainingRows:
    x: Any
    y: Any
    unit: Any


def parse_data(body: bytes, spec: TrainingSpec) -> TrainingRows:
    """The .npz the worker sent, checked against the spec; the messages never hold values."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("X", "y", "unit")}
    except KeyError as exc:
        raise ValueError(f"the data lacks the array {exc}") from exc
    except Exception as exc:  # numpy raises ValueError, OSError, zipfile.BadZipFile ...
        raise ValueError(f"the data is not a readable .npz ({type(exc).__name__})") from exc
    x, y, unit = arrays["X"], arrays["y"], arrays["unit"]
    if x.shape[1:] != spec.row_shape or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"X must be a float array of shape (rows, {', '.join(map(str, spec.row_shape))})")
    rows = x.shape[0]
    if unit.shape != (rows,) or not np.issubdtype(unit.dtype, np.integer):
        raise ValueError("unit must be an integer array with one id per row")
    if rows and (int(unit.min()) < 0 or int(unit.max()) >= spec.n_units):
        raise ValueError("a unit id is outside [0, n_units)")
    if spec.task == "classification":
        if y.shape != (rows,) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError("y must hold one integer class index per row")
        if rows and (int(y.min()) < 0 or int(y.max()) >= spec.n_outputs):
            raise ValueError("a class index is outside [0, n_outputs)")
        y = y.astype(np.int64)
    else:
        if y.shape not in ((rows,), (rows, spec.n_outputs)) or not np.issubdtype(y.dtype, np.floating):
            raise ValueError("y must hold float targets, (rows,) or (rows, n_outputs)")
        if y.ndim == 1 and spec.n_outputs != 1:
            raise ValueError("y must be (rows, n_outputs) for several outputs")
        y = y.astype(np.float32).reshape(rows, spec.n_outputs)
    return TrainingRows(x=x.astype(np.float32), y=y, unit=unit.astype(np.int64))


# The run ----------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What was made of the export before the data came: a program and its clippers, or why not."""

    refusal: str | None = None
    program: Any = None
    clipper: Any = None
    fallback: Any = None
    notes: list[str] = field(default_factory=list)


def prepare(spec: TrainingSpec, config: dpsgd.DpSgdConfig, graph_bytes: bytes, tensor_bytes: bytes) -> Prepared:
    """Load and dry-run the export; a refusal is kept, not shown."""
    try:
        program = load_program(graph_bytes, tensor_bytes).to(training_device())
        clipper, fallback, why_not_fast = dpsgd.choose_clipper(program, spec.row_shape, config)
    except ExportRefused as exc:
        return Prepared(refusal=f"the model was refused: {exc}")
    except Exception as exc:  # a torch error on random rows: the model cannot be trained
        return Prepared(refusal=f"the model cannot be trained per unit: {type(exc).__name__}: {exc}")
    notes = [] if not why_not_fast else [f"per-unit gradients by vmap (the fast path does not apply: {why_not_fast})"]
    return Prepared(program=program, clipper=clipper, fallback=fallback, notes=notes)


def run(spec: TrainingSpec, paths: Paths, *, export_timeout_s: float = EXPORT_TIMEOUT_S) -> int:
    """The whole flow of the module docstring; returns the exit code.

    After the child has run, nothing may fail, print or take a different time before the data arrives: any
    such difference could be steered by buyer code that had taken the data. Every finding waits for it.
    """
    model_file = paths.code / spec.model_module
    if not model_file.is_file():
        say(f"refused: {spec.model_module} is not in the bundle")
        return EXIT_REFUSED
    code_sha256 = hashlib.sha256(model_file.read_bytes()).hexdigest()
    try:
        noise_multiplier = dpsgd.calibrate_noise(epsilon=spec.epsilon, delta=spec.delta,
                                                 sample_rate=spec.sample_rate, steps=spec.steps)
    except ValueError as exc:
        say(f"refused: no noise level reaches epsilon {spec.epsilon} in {spec.steps} steps ({exc})")
        return EXIT_ENVIRONMENT
    config = dpsgd.DpSgdConfig(task=spec.task, n_outputs=spec.n_outputs, learning_rate=spec.learning_rate,
                               max_grad_norm=spec.max_grad_norm, noise_multiplier=noise_multiplier,
                               sample_rate=spec.sample_rate, steps=spec.steps, n_units=spec.n_units,
                               max_rows_per_unit=spec.max_rows_per_unit, delta=spec.delta)

    # Phase 1: the buyer's code, alone, with no data.
    export_dir = Path(tempfile.mkdtemp(prefix="export-", dir=paths.work))
    folder_fd = os.open(export_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        child = run_export_child(spec, paths, export_dir, export_timeout_s)
        try:
            graph_bytes, tensor_bytes = read_export(folder_fd)
            unreadable: str | None = None
        except ValueError as exc:
            graph_bytes, tensor_bytes, unreadable = b"", b"", str(exc)
    finally:
        os.close(folder_fd)
    uncleared: str | None = None
    for folder in (paths.work, paths.output, *([CONTAINER_SHM] if is_container_init() else [])):
        try:
            wipe(folder)
        except OSError as exc:
            if folder != CONTAINER_SHM:
                uncleared = f"failed: could not clear {folder} after the model's code ran ({exc})"

    # Nothing about the export is judged before the data comes: not even how long judging it takes.
    try:
        body = fetch_data(paths.socket)
    except DataUnavailable as exc:
        if exc.exit_code == EXIT_DATA_TAKEN:
            time.sleep(max(0.0, child.deadline - time.monotonic()))
        say(f"failed: {exc}")
        return exc.exit_code

    # The child never had the data: its output is the buyer's own, from before any data was here.
    if uncleared is not None:
        prepared = Prepared(refusal=uncleared)
    elif child.returncode != 0:
        prepared = Prepared(refusal=_child_failure(child, export_timeout_s))
    elif unreadable is not None:
        prepared = Prepared(refusal=f"the model was refused: {unreadable}")
    else:
        prepared = prepare(spec, config, graph_bytes, tensor_bytes)
    del graph_bytes, tensor_bytes
    _show_child_output(child)
    if prepared.refusal is not None:
        say(prepared.refusal)
        return EXIT_REFUSED
    try:
        data = parse_data(body, spec)
    except ValueError as exc:
        say(f"failed: the worker's training data is malformed: {exc}")
        return EXIT_WORKER
    del body
    for note in prepared.notes:
        print(note, flush=True)
    return _train_and_write(spec, paths, config, prepared, data, code_sha256)


def _child_failure(child: ChildOutcome, timeout_s: float) -> str:
    if child.returncode is None:
        return f"refused: building and exporting the model did not finish within {timeout_s:.0f} s"
    return (f"refused: building or exporting the model failed (exit status {child.returncode}); "
            "its output is above")


def _show_child_output(child: ChildOutcome) -> None:
    if not child.logs:
        return
    text = child.logs.decode("utf-8", "replace")
    print("----- output of the model's code (build_model and export, before any data was in the container) -----")
    print(text, end="" if text.endswith("\n") else "\n")
    if child.truncated:
        print(f"----- (cut at {LOG_LIMIT_BYTES // 1024} KiB) -----")
    print("----- end of the model code's output -----", flush=True)


def _train_and_write(spec: TrainingSpec, paths: Paths, config: dpsgd.DpSgdConfig, prepared: Prepared,
                     data: TrainingRows, code_sha256: str) -> int:
    program = prepared.program
    try:
        device = program.device
        rows = dpsgd.UnitRows(torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device),
                              torch.from_numpy(data.unit).to(device), n_units=spec.n_units,
                              max_rows_per_unit=spec.max_rows_per_unit)
    except ValueError as exc:
        say(f"failed: the worker's training data is malformed: {exc}")
        return EXIT_WORKER
    del data
    try:
        result = dpsgd.train(program, rows, config, clipper=prepared.clipper, fallback=prepared.fallback,
                             progress=lambda step, steps, epsilon: post_progress(paths.socket, step, steps,
                                                                                 epsilon))
    except Exception as exc:
        # Only the type: a message computed on the rows could carry their values.
        say(f"failed: training stopped with {type(exc).__name__}; no model was written")
        return EXIT_TRAINING
    if not result.epsilon <= spec.epsilon + EPSILON_SLACK or not math.isfinite(result.epsilon):
        say(f"failed: the accountant reports epsilon {result.epsilon} above the budget {spec.epsilon}; "
            "no model was written")
        return EXIT_TRAINING
    state = {key: (result.parameters[target] if target in result.parameters else program.fixed[target])
             .detach().cpu().clone().contiguous() for key, target in program.state_dict_keys.items()}
    weights_path = paths.output / "model.safetensors"
    safetensors.torch.save_file(state, str(weights_path))
    record = {"code_sha256": code_sha256, "dataset": spec.dataset, "version": spec.version,
              "epsilon": result.epsilon, "delta": spec.delta, "steps": result.steps,
              "sample_rate": config.sample_rate, "noise_multiplier": config.noise_multiplier,
              "max_grad_norm": spec.max_grad_norm, "accountant": "rdp", "epochs": spec.epochs,
              "batch_size": spec.batch_size, "learning_rate": spec.learning_rate, "n_units": spec.n_units,
              "max_rows_per_unit": spec.max_rows_per_unit, "features": list(spec.features), "label": spec.label,
              "n_features": spec.n_features, "n_outputs": spec.n_outputs, "task": spec.task,
              **({"input_shape": list(spec.row_shape)} if spec.is_image else {}),
              "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest()}
    (paths.output / "training-record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained {result.steps} DP-SGD steps ({result.clipper} clipping, noise multiplier "
          f"{config.noise_multiplier:.4f}): epsilon {result.epsilon:.4f} at delta {spec.delta:g}", flush=True)
    return 0


def training_device() -> torch.device:
    """A GPU when the job was given one (the worker adds the device request), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def limit_threads() -> None:
    """Use as many torch threads as the container's CPU quota, not the host's core count."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    torch.set_num_threads(max(1, min(cpus, torch.get_num_threads())))


def main() -> int:
    make_undumpable()
    if is_container_init():
        # PID 1 ignores signals it has no handler for when they come from inside the container; Python's
        # SIGINT handler would let the buyer's code interrupt us.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        spec = parse_spec(os.environ.get("SANDBOX_TRAINING", ""))
    except SpecError as exc:
        say(f"refused: {exc}")
        return EXIT_ENVIRONMENT
    limit_threads()
    timeout = float(os.environ.get("SANDBOX_TRAINER_EXPORT_TIMEOUT_S", EXPORT_TIMEOUT_S))
    return run(spec, Paths.from_env(), export_timeout_s=timeout)


if __name__ == "__main__":
    sys.exit(main())
