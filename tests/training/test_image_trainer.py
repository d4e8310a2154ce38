"""The platform's DP-SGD trainer on images: 4-D rows (rows, channels, height, width), a buyer CNN built with the
image shape, clipping per patient (a patient's several images clip together), and the spec's image fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from programs import exported
from sandbox_trainer import dpsgd, export, run
from sandbox_trainer.graph import load_program
from sandbox_trainer.spec import SpecError, parse_spec
from worker_stub import WorkerStub, npz_bytes

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "images" / "training"
BUYER_CODE = Path(__file__).resolve().parent / "buyer_code"
BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
             "runpy.run_module('sandbox_trainer.run', run_name='__main__', alter_sys=True)")
SHAPE = (1, 16, 16)
PATIENTS = 40

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def image_spec(**changes: Any) -> dict[str, Any]:
    base = {"kind": "dp_training", "dataset": "retina-a", "version": 1, "model_module": "model.py",
            "features": ["image"], "label": "label", "task": "classification", "n_features": 256, "n_outputs": 2,
            "epochs": 2, "batch_size": 10, "learning_rate": 0.5, "max_grad_norm": 1.0, "epsilon": 3.0,
            "delta": 1e-5, "n_units": PATIENTS, "max_rows_per_unit": 3, "input_shape": list(SHAPE)}
    return {**base, **changes}


def image_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each patient 1 to 3 images; label 1 patients have a bright square."""
    rng = np.random.default_rng(3)
    unit = np.repeat(np.arange(PATIENTS), 1 + np.arange(PATIENTS) % 3)
    label = (unit % 2).astype(np.int64)
    x = rng.uniform(0.0, 0.3, size=(unit.size, *SHAPE)).astype(np.float32)
    x[label == 1, :, 6:10, 6:10] = 0.9
    return x, label, unit.astype(np.int64)


def build_cnn(n_outputs: int = 2) -> torch.nn.Module:
    sys.path.insert(0, str(BUYER_CODE))
    try:
        import small_cnn
    finally:
        sys.path.remove(str(BUYER_CODE))
    model: torch.nn.Module = small_cnn.build_model(256, n_outputs, input_shape=SHAPE)
    return model


def test_a_cnn_trains_on_images_and_its_weights_load_into_build_model(tmp_path: Path) -> None:
    code, output, work = tmp_path / "code", tmp_path / "output", tmp_path / "tmp"
    for folder in (code, output, work):
        folder.mkdir()
    (code / "model.py").write_bytes((BUYER_CODE / "small_cnn.py").read_bytes())
    worker = WorkerStub(npz_bytes(*image_rows()))
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SANDBOX_TRAINING": json.dumps(image_spec()),
               "SANDBOX_TRAINER_CODE": str(code), "SANDBOX_TRAINER_OUTPUT": str(output),
               "SANDBOX_TRAINER_TMP": str(work), "SANDBOX_DP_SOCKET": str(worker.path),
               "SANDBOX_TRAINER_EXPORT_TIMEOUT_S": "120"}
        done = subprocess.run([sys.executable, "-I", "-c", BOOTSTRAP, str(PACKAGE_ROOT)], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        worker.close()
    assert done.returncode == 0, done.stderr
    assert "building a small CNN for 1x16x16 images (256 values)" in done.stdout, "build_model got no input_shape"
    assert "book-keeping" in done.stdout or "bookkeeping clipping" in done.stdout, done.stdout
    record = json.loads((output / "training-record.json").read_text())
    assert record["input_shape"] == list(SHAPE) and record["features"] == ["image"]
    assert 0 < record["epsilon"] <= 3.0
    model = build_cnn()
    model.load_state_dict(safetensors.torch.load_file(str(output / "model.safetensors")))  # strict
    assert model(torch.zeros(2, *SHAPE)).shape == (2, 2)


def test_build_model_without_input_shape_is_called_as_before() -> None:
    class Module:
        @staticmethod
        def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_features, n_outputs))

    model = export.build(Module, 256, 2, SHAPE)
    program = load_program(*exported_shape(model, SHAPE))
    assert program.forward(program.parameters, torch.zeros(3, *SHAPE)).shape == (3, 2)


def exported_shape(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    graph, tensors = export.serialise(export.export_model(model, shape), model)
    return graph, safetensors.torch.save(tensors)


@pytest.mark.parametrize("clipper_class", [dpsgd.BookkeepingClipper, dpsgd.VmapClipper])
def test_a_patients_images_clip_together_below_max_grad_norm(clipper_class: type) -> None:
    """Per-patient norms match a direct computation (the gradient of the patient's summed losses), and each
    patient's clipped contribution, alone in a batch, never exceeds max_grad_norm."""
    torch.manual_seed(0)
    model = build_cnn()
    program = load_program(*exported_shape(model, SHAPE))
    x, y, unit = (torch.from_numpy(array) for array in image_rows())
    x, y, unit = x[:15], y[:15], unit[:15]
    patients = int(unit.max()) + 1
    max_grad_norm = 0.05
    config = dpsgd.DpSgdConfig(task="classification", n_outputs=2, learning_rate=0.1, max_grad_norm=max_grad_norm,
                               noise_multiplier=1.0, sample_rate=0.5, steps=1, n_units=patients, max_rows_per_unit=3,
                               delta=1e-5)
    rows = dpsgd.UnitRows(x, y, unit, n_units=patients, max_rows_per_unit=3)
    clipper = clipper_class(program, config)
    expected = []
    for patient in range(patients):
        model.zero_grad()
        mine = unit == patient
        torch.nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum").backward()
        expected.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())))
        alone = clipper.clipped_sum(program.parameters, rows.batch(np.array([patient])))
        norm = torch.sqrt(sum(value.square().sum() for value in alone.sums.values()))
        assert float(norm) <= max_grad_norm * (1 + 1e-4), f"patient {patient} contributes {float(norm)}"
    together = clipper.clipped_sum(program.parameters, rows.batch(np.arange(patients)))
    torch.testing.assert_close(together.norms, torch.stack(expected), rtol=1e-4, atol=1e-6)
    assert bool((together.norms > max_grad_norm).all()), "the test must clip every patient"


def test_choose_clipper_takes_the_fast_path_for_a_small_cnn() -> None:
    program = load_program(*exported_shape(build_cnn(), SHAPE))
    config = dpsgd.DpSgdConfig(task="classification", n_outputs=2, learning_rate=0.1, max_grad_norm=1.0,
                               noise_multiplier=1.0, sample_rate=0.5, steps=1, n_units=4, max_rows_per_unit=3,
                               delta=1e-5)
    clipper, _, why_not = dpsgd.choose_clipper(program, SHAPE, config)
    assert isinstance(clipper, dpsgd.BookkeepingClipper), why_not


def test_a_table_model_still_exports_from_n_features() -> None:
    graph, _ = exported(torch.nn.Linear(4, 2), 4)
    assert b"linear" in graph


@pytest.mark.parametrize(("changes", "field"), [
    ({"input_shape": [2, 16, 16]}, "input_shape"),
    ({"input_shape": [1, 0, 16]}, "input_shape"),
    ({"input_shape": [1, 16]}, "input_shape"),
    ({"input_shape": [1, 16, 16], "n_features": 255}, "n_features"),
    ({"features": ["pixels"]}, "features must be"),
])
def test_a_malformed_image_spec_is_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_spec(json.dumps(image_spec(**changes)))


def test_image_data_of_the_wrong_shape_is_refused() -> None:
    spec = parse_spec(json.dumps(image_spec()))
    assert spec.row_shape == SHAPE and spec.record_fields()["input_shape"] == list(SHAPE)
    flat = np.zeros((3, 256), np.float32)
    with pytest.raises(ValueError, match="shape"):
        run.parse_data(npz_bytes(flat, np.array([0, 1, 1]), np.array([0, 1, 2])), spec)
    parsed = run.parse_data(npz_bytes(np.zeros((3, *SHAPE), np.float32), np.array([0, 1, 1]), np.array([0, 1, 2])),
                            spec)
    assert parsed.x.shape == (3, *SHAPE)
