"""The membership-inference gate, with real scikit-learn, skops, ONNX, torch, Opacus and SACRO-ML.

The data is shaped like the demo registry: a few thousand rows, ten numeric features (an integer age, a
binary flag, continuous measurements) and a noisy binary outcome, so that a model which memorises its
training rows is told apart from one which generalises.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import skops.io
from sandbox_trainer import gate
from sandbox_trainer.gate import AttackSettings, GateData, GateSpec, attack_classifier, gate_model
from sandbox_trainer.models import ModelRefused, load_model

from sandbox.egress.models import GateThresholds, gate_checks
from sandbox.egress.verdicts import Verdict

FEATURES = [f"x{i}" for i in range(10)]
TRAINING_DIR = Path(__file__).resolve().parents[2] / "images" / "training"


def registry_like(rows: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 10))
    x[:, 0] = np.round(rng.normal(67, 8.5, rows))
    x[:, 1] = rng.integers(0, 2, rows)
    risk = 0.8 * x[:, 2] - 0.6 * x[:, 3] + 0.05 * (x[:, 0] - 67) + 0.5 * x[:, 1]
    y = (rng.random(rows) < 1 / (1 + np.exp(-risk))).astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = registry_like()
    return x[:1500], y[:1500], x[1500:], y[1500:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, rows: Any) -> Path:
    train_x, train_y, holdout_x, holdout_y = rows
    folder = tmp_path_factory.mktemp("data")
    for name, x, y in (("train", train_x, train_y), ("holdout", holdout_x, holdout_y)):
        columns = {f: x[:, i] for i, f in enumerate(FEATURES)}
        columns["outcome"] = y.astype(bool)
        columns["patient_id"] = [f"P{n:06d}" for n in range(len(y))]
        pq.write_table(pa.table(columns), folder / f"{name}.parquet")
    return folder


@pytest.fixture(scope="module")
def data(data_dir: Path) -> GateData:
    return GateData.load(data_dir, GateSpec("outcome", FEATURES, "classification", ["m.skops"]))


def verdicts(entry: dict[str, Any]) -> dict[str, Verdict]:
    return {c.rule: c.verdict for c in gate_checks(entry, {})}


def skops_of(model: Any, rows: Any) -> bytes:
    train_x, train_y, _, _ = rows
    return skops.io.dumps(model.fit(train_x, train_y.astype(bool)))


def test_a_one_nearest_neighbour_classifier_is_blocked_by_its_weights_and_its_attacks(data: GateData,
                                                                                      rows: Any) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    entry = gate_model(skops_of(KNeighborsClassifier(1), rows), "knn.skops", data)
    assert entry["loaded"] and {(r["tensor"], r["what"]) for r in entry["weights"]["reproduces"]} >= {
        ("model._fit_X", "row")}, "the stored training rows were not found"
    assert {a["name"] for a in entry["attacks"]} == {"worst_case", "lira"}
    assert max(a["auc"] for a in entry["attacks"]) > GateThresholds().max_auc, "the attacks missed a 1-NN model"
    assert verdicts(entry) == {"model-file": Verdict.PASS, "model-weights": Verdict.BLOCK,
                               "membership-inference": Verdict.BLOCK}


def test_a_tree_grown_to_purity_is_blocked_by_the_attacks_alone(data: GateData, rows: Any) -> None:
    from sklearn.tree import DecisionTreeClassifier

    entry = gate_model(skops_of(DecisionTreeClassifier(random_state=0), rows), "tree.skops", data)
    assert entry["weights"]["reproduces"] == [] and entry["weights"]["checked_tensors"] > 0
    assert verdicts(entry) == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                               "membership-inference": Verdict.BLOCK}
    worst_case = next(a for a in entry["attacks"] if a["name"] == "worst_case")
    assert worst_case["auc"] > 0.65 and entry["per_record_risk"]["method"] == "lira"


@pytest.mark.parametrize("kind", ["logistic", "shallow-boosting"])
def test_a_regularised_model_passes(data: GateData, rows: Any, kind: str) -> None:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=0.1) if kind == "logistic" else GradientBoostingClassifier(
        n_estimators=30, max_depth=2, random_state=0)
    entry = gate_model(skops_of(model, rows), f"{kind}.skops", data)
    assert verdicts(entry) == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                               "membership-inference": Verdict.PASS}, gate_checks(entry, {})
    assert all(0.4 < a["auc"] < GateThresholds().max_auc for a in entry["attacks"]), entry["attacks"]
    assert entry["per_record_risk"]["high_risk"] / entry["per_record_risk"]["n_records"] < 0.05


def with_scaling(network: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """The network with the training features' standardisation built in, giving probabilities."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

        def forward(self, features: Any) -> Any:
            return torch.softmax(self.network((features - self.mean) / self.std), dim=1)

    return Scaled().eval()


@pytest.fixture(scope="module")
def dp_model(rows: Any) -> Any:
    """A small MLP trained with Opacus' DP-SGD to epsilon 1 (delta 1e-5)."""
    import torch
    from opacus import PrivacyEngine

    train_x, train_y, _, _ = rows
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    dataset = torch.utils.data.TensorDataset(torch.tensor((train_x - mean) / std, dtype=torch.float32),
                                             torch.tensor(train_y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private_with_epsilon(
        module=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.5), data_loader=loader,
        target_epsilon=1.0, target_delta=1e-5, epochs=10, max_grad_norm=1.0)
    for _ in range(10):
        for batch_x, batch_y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(private(batch_x), batch_y).backward()
            optimizer.step()
    assert engine.get_epsilon(1e-5) == pytest.approx(1.0, abs=0.1)
    return with_scaling(private._module, mean, std)


def test_a_dp_trained_model_passes_through_a_predict_proba_callable(dp_model: Any, rows: Any) -> None:
    import torch

    def predict_proba(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return dp_model(torch.tensor(features, dtype=torch.float32)).numpy()

    train_x, train_y, holdout_x, holdout_y = rows
    assert (predict_proba(holdout_x).argmax(axis=1) == holdout_y).mean() > 0.6, "the DP model learnt nothing"
    outcome = attack_classifier(predict_proba, train_x, train_y, holdout_x, holdout_y)
    [attack] = outcome.attacks
    limits = GateThresholds()
    assert attack.name == "worst_case" and attack.auc < limits.max_auc
    assert attack.tpr_at_fpr["0.01"] < limits.max_tpr_at_fpr
    assert outcome.per_record is not None and outcome.per_record.method == "loss_rank"
    assert outcome.per_record.high_risk / outcome.per_record.records < limits.max_high_risk_fraction


def export_onnx(module: Any, path: Path) -> bytes:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(4, 10),), str(path), dynamo=False, input_names=["features"],
                          output_names=["probabilities"], dynamic_axes={"features": {0: "rows"},
                                                                        "probabilities": {0: "rows"}})
    return path.read_bytes()


def test_a_dp_trained_model_passes_as_an_onnx_file(dp_model: Any, data: GateData, tmp_path: Path) -> None:
    entry = gate_model(export_onnx(dp_model, tmp_path / "dp.onnx"), "dp.onnx", data)
    assert entry["format"] == "onnx" and entry["loaded"] and [a["name"] for a in entry["attacks"]] == ["worst_case"]
    assert verdicts(entry) == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                               "membership-inference": Verdict.PASS}, gate_checks(entry, {})


# --- Files the gate refuses, without running them -------------------------------------------------

class Marker:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def hostile_files(folder: Path, marker: Path) -> dict[str, bytes]:
    """A pickle, a torch.save file, a pickle dressed as skops, a skops file with an untrusted type, and an ONNX
    file with external data: every one would create `marker` if anything ran it."""
    import onnx
    import torch
    from onnx import helper, numpy_helper
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    files = {"model.pkl": pickle.dumps(Marker(marker)), "model.skops": pickle.dumps(Marker(marker))}
    torch.save({"state": Marker(marker)}, folder / "model.pt")
    files["model.pt"] = (folder / "model.pt").read_bytes()
    files["untrusted.skops"] = skops.io.dumps(make_pipeline(FunctionTransformer(os.getcwd)))
    weight = numpy_helper.from_array(np.ones((10, 2), dtype=np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "weight"], ["probabilities"])], "g",
                              [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, 10])],
                              [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 2])],
                              [weight])
    onnx.save_model(helper.make_model(graph), str(folder / "external.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.bin", size_threshold=0)
    files["external.onnx"] = (folder / "external.onnx").read_bytes()
    return files


def test_files_that_could_run_code_are_refused_with_the_reason_named(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    files = hostile_files(tmp_path, marker)
    reasons = {}
    for name, content in files.items():
        with pytest.raises(ModelRefused) as refused:
            load_model(content, name, task="classification")
        reasons[name] = (refused.value.format.value, refused.value.reason, refused.value.untrusted_types)
    assert not marker.exists(), "the gate ran code from a model file"
    assert reasons["model.pkl"][:1] == ("pickle",) and "pickle runs code" in reasons["model.pkl"][1]
    assert reasons["model.skops"][:1] == ("pickle",), "a pickle named .skops was not recognised"
    assert reasons["model.pt"][:1] == ("torch",) and "torch.save" in reasons["model.pt"][1]
    assert reasons["untrusted.skops"][0] == "skops" and "does not trust" in reasons["untrusted.skops"][1]
    assert reasons["untrusted.skops"][2] == ["posix.getcwd"]
    assert reasons["external.onnx"][0] == "onnx" and "external data" in reasons["external.onnx"][1]


def test_an_onnx_model_holding_rows_is_blocked_by_its_weights(data: GateData, rows: Any) -> None:
    import onnx
    from onnx import helper, numpy_helper

    train_x = rows[0]
    weight = np.random.default_rng(2024).normal(size=(10, 2)).astype(np.float32)
    stash = numpy_helper.from_array(train_x[:50].astype(np.float32), "stash")  # unused by the graph
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "weight"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "g",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, 10])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(weight, "weight"), stash])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = gate_model(model.SerializeToString(), "stash.onnx", data)
    # Rows hold continuous features, so they match after float32 rounding; the integer ages match exactly.
    assert {(r["tensor"], r["what"], r["rounding"]) for r in entry["weights"]["reproduces"]} == {
        ("stash", "row", "float32"), ("stash", "column", "exact")}
    assert verdicts(entry)["model-weights"] is Verdict.BLOCK


def test_a_bare_safetensors_file_is_not_attacked_and_goes_to_review(data: GateData) -> None:
    weights = {"layer.weight": np.random.default_rng(2024).normal(size=(10, 32)).astype(np.float32)}
    entry = gate_model(safetensors.numpy.save(weights), "weights.safetensors", data)
    assert entry["loaded"] and entry["attacks"] == [] and "no architecture" in entry["attacks_not_run"]
    assert verdicts(entry) == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                               "membership-inference": Verdict.REVIEW}


def test_tampered_trees_are_refused_before_anything_walks_them(rows: Any) -> None:
    from sklearn.tree import DecisionTreeClassifier

    tree = DecisionTreeClassifier(random_state=0, max_depth=4).fit(rows[0], rows[1])
    original = skops.io.dumps(tree)
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        schema = json.loads(archive.read("schema.json"))
        contents = {n: archive.read(n) for n in archive.namelist()}
    # Point the root's left child back at the root: predicting would loop for ever.
    tree_state = schema["content"]["content"]["tree_"]["content"]["content"]
    nodes_file = tree_state["nodes"]["file"]
    nodes = np.load(io.BytesIO(contents[nodes_file]), allow_pickle=False)
    nodes["left_child"][0] = 0
    buffer = io.BytesIO()
    np.save(buffer, nodes, allow_pickle=False)
    contents[nodes_file] = buffer.getvalue()
    tampered = io.BytesIO()
    with zipfile.ZipFile(tampered, "w") as archive:
        for name, content in contents.items():
            archive.writestr(name, content)
    with pytest.raises(ModelRefused, match="points outside itself or back up the tree"):
        load_model(tampered.getvalue(), "tree.skops", task="classification")
    assert load_model(original, "tree.skops", task="classification").predict_proba is not None


# --- The whole run ------------------------------------------------------------------------------

ENTRY_KEYS = {"format", "loaded", "problem", "attacks", "attacks_not_run", "attacks_skipped", "per_record_risk",
              "weights"}


def numbers_in(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_the_gate_run_writes_a_report_of_counts_and_scores_only(tmp_path: Path, data_dir: Path, rows: Any) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    code, output, marker = tmp_path / "code", tmp_path / "output", tmp_path / "ran"
    (code / "models").mkdir(parents=True)
    models = {"models/knn.skops": skops_of(KNeighborsClassifier(1), rows),
              "models/logistic.skops": skops_of(LogisticRegression(C=0.1), rows),
              "models/weights.safetensors": safetensors.numpy.save(
                  {"w": np.random.default_rng(2024).normal(size=(10, 4)).astype(np.float32)})}
    for name, content in hostile_files(tmp_path, marker).items():
        models[f"models/{name}"] = content
    for name, content in models.items():
        (code / name).write_bytes(content)
    (code / "models" / "linked.skops").symlink_to(code / "models" / "logistic.skops")
    names = [*models, "models/linked.skops", "models/missing.onnx"]
    (code / "gate.json").write_text(json.dumps({"label": "outcome", "features": FEATURES, "task": "classification",
                                                "models": names, "max_rows": 5000}))
    # As the image runs it (`python -I -m`), but with the package found from images/training: -E -s is -I
    # without -P, so that the working folder is on the path.
    command = [sys.executable, "-E", "-s", "-m", "sandbox_trainer.gate", "--data", str(data_dir), "--code", str(code),
               "--output", str(output)]
    result = subprocess.run(command, cwd=TRAINING_DIR, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "the gate ran code from a model file"
    text = (output / "report.json").read_text()
    report = json.loads(text)
    assert set(report) == {"models"} and sorted(report["models"]) == sorted(names)
    for name, entry in report["models"].items():
        assert ENTRY_KEYS <= set(entry) <= ENTRY_KEYS | {"untrusted_types"}, name
    entries = report["models"]
    assert entries["models/knn.skops"]["loaded"] and entries["models/knn.skops"]["weights"]["reproduces"]
    assert {a["name"] for a in entries["models/logistic.skops"]["attacks"]} == {"worst_case", "lira"}
    assert entries["models/weights.safetensors"]["attacks_not_run"].startswith("a bare safetensors file")
    assert entries["models/weights.safetensors"]["weights"] == {"checked_tensors": 1, "skipped_tensors": 0,
                                                                 "reproduces": []}
    refused = {n: e["format"] for n, e in entries.items() if not e["loaded"]}
    assert refused == {"models/model.pkl": "pickle", "models/model.skops": "pickle", "models/model.pt": "torch",
                       "models/untrusted.skops": "skops", "models/external.onnx": "onnx",
                       "models/linked.skops": "unknown", "models/missing.onnx": "unknown"}
    assert "symbolic link" in entries["models/linked.skops"]["problem"]
    verdict = {n: {c.rule: c.verdict for c in gate_checks(e, {})} for n, e in entries.items()}
    assert verdict["models/knn.skops"]["membership-inference"] is Verdict.BLOCK
    assert set(verdict["models/logistic.skops"].values()) == {Verdict.PASS}
    assert all(verdict[n]["model-file"] is Verdict.BLOCK for n in refused)
    # No value from the data: every number is a count or a score to 3 decimals, and no identifier appears.
    train_x = rows[0]
    continuous = set(train_x[:, 2:].ravel().tolist())
    for number in numbers_in(report):
        assert number not in continuous and number == round(number, 3), f"the report holds {number}"
    assert not re.search(r"P\d{6}", text), "the report holds a row identifier"


def test_a_malformed_gate_json_fails_the_run_and_judges_nothing(tmp_path: Path, data_dir: Path) -> None:
    code, output = tmp_path / "code", tmp_path / "output"
    code.mkdir()
    (code / "gate.json").write_text(json.dumps({"label": "outcome", "features": ["nope"], "task": "classification",
                                                "models": ["m.skops"]}))
    with pytest.raises(gate.GateError, match="lacks the columns"):
        gate.run_gate(data_dir=data_dir, code_dir=code, output_dir=output)
    report = json.loads((output / "report.json").read_text())
    assert report["models"] == {} and "lacks the columns" in report["problem"]
    assert gate_checks(report["models"].get("m.skops"), {})[0].verdict is Verdict.BLOCK


def test_a_regressor_meets_the_loss_threshold_attack(tmp_path: Path, rows: Any) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.tree import DecisionTreeRegressor

    train_x, _, holdout_x, _ = rows
    rng = np.random.default_rng(1)
    target = lambda x: 2 * x[:, 2] - x[:, 4] + rng.normal(scale=1.5, size=len(x))  # noqa: E731
    train_y, holdout_y = target(train_x), target(holdout_x)
    folder = tmp_path / "data"
    folder.mkdir()
    for name, x, y in (("train", train_x, train_y), ("holdout", holdout_x, holdout_y)):
        columns = {f: x[:, i] for i, f in enumerate(FEATURES)} | {"length_of_stay": y}
        pq.write_table(pa.table(columns), folder / f"{name}.parquet")
    data = GateData.load(folder, GateSpec("length_of_stay", FEATURES, "regression", ["m.skops"]))
    settings = AttackSettings()
    ridge = gate_model(skops.io.dumps(Ridge().fit(train_x, train_y)), "ridge.skops", data, settings)
    deep = gate_model(skops.io.dumps(DecisionTreeRegressor(random_state=0).fit(train_x, train_y)), "tree.skops",
                      data, settings)
    assert [a["name"] for a in ridge["attacks"]] == ["loss_threshold"]
    assert verdicts(ridge)["membership-inference"] is Verdict.PASS, gate_checks(ridge, {})
    assert verdicts(deep)["membership-inference"] is Verdict.BLOCK, gate_checks(deep, {})
