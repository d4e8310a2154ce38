"""The weights check: training rows and columns found in tensors, ordinary models left alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import safetensors.numpy
from sandbox_trainer import weights
from sandbox_trainer.models import estimator_arrays, load_model
from sandbox_trainer.weights import TrainingNeedles, check_tensors

from sandbox.demo import generate_registry


def synthetic(rows: int = 2000, seed: int = 3) -> np.ndarray:
    """Ten numeric columns: an integer age, a binary flag, eight continuous measurements."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(rows, 10))
    data[:, 0] = np.round(rng.normal(67, 8.5, rows))
    data[:, 1] = rng.integers(0, 2, rows)
    return data


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    return synthetic()


@pytest.fixture(scope="module")
def needles(train: np.ndarray) -> TrainingNeedles:
    return TrainingNeedles(train)


def found(tensors: dict[str, np.ndarray], needles: TrainingNeedles) -> set[tuple[str, str, str]]:
    return {(r.tensor, r.what, r.rounding) for r in check_tensors(tensors.items(), needles).reproduces}


def as_safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save(tensors)


def test_a_safetensors_tensor_holding_a_row_after_float16_rounding_is_found(train: np.ndarray,
                                                                            needles: TrainingNeedles) -> None:
    hidden = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float16)
    hidden[17, 5:15] = train[123].astype(np.float16)
    model = load_model(as_safetensors({"encoder.weight": hidden}), "model.safetensors", task="classification")
    assert found(dict(model.tensors), needles) == {("encoder.weight", "row", "float16")}, \
        "a training row stored in float16 was not found"


def test_a_safetensors_tensor_holding_a_column_is_found_in_row_order_and_sorted(train: np.ndarray,
                                                                                 needles: TrainingNeedles) -> None:
    in_order = np.zeros((3, 400), dtype=np.float32)
    in_order[1, 50:250] = train[300:500, 4]
    in_sorted_order = np.sort(train[:, 7])[:-1].reshape(-1, 1)  # one column of a 2-D tensor
    file = as_safetensors({"a": in_order, "b": in_sorted_order})
    model = load_model(file, "model.safetensors", task="classification")
    assert found(dict(model.tensors), needles) == {("a", "column", "float32"), ("b", "column", "exact")}


def test_a_row_down_the_column_of_a_matrix_is_found(train: np.ndarray, needles: TrainingNeedles) -> None:
    matrix = np.random.default_rng(1).normal(size=(40, 40))
    matrix[:10, 7] = train[42]
    assert found({"w": matrix}, needles) == {("w", "row", "exact")}


def test_random_tensors_and_plain_vectors_are_not_found(needles: TrainingNeedles) -> None:
    rng = np.random.default_rng(2)
    ordinary = {
        "random": rng.normal(size=(512, 512)).astype(np.float32),
        "random16": rng.normal(size=(100_000,)).astype(np.float16),
        "zeros": np.zeros(1000), "ones": np.ones((30, 30)),
        "flags": rng.integers(0, 2, 5000).astype(np.float64),  # like the binary column, but at most 2 values
        "indices": np.arange(10_000, dtype=np.int64),
    }
    finding = check_tensors(ordinary.items(), needles)
    assert finding.reproduces == [], f"ordinary tensors tripped the check: {finding.reproduces}"
    assert finding.checked_tensors == len(ordinary)


def test_ordinary_models_on_the_demo_registry_do_not_trip_it_but_stored_rows_do() -> None:
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    # Integer and boolean columns with few distinct values: the hard case for chance matches.
    table = generate_registry(1500)
    names = ["age", "stenosis_pct", "symptomatic", "stroke_death_30d", "restenosis_1y", "length_of_stay"]
    data = np.column_stack([np.asarray(table.column(n).cast(pa.float64())) for n in names])
    features = [0, 1, 2, 4, 5]
    needles = TrainingNeedles(data, [features, list(range(len(names)))])
    x, y = data[:, features], data[:, 3]
    for model in (DecisionTreeClassifier(random_state=0), RandomForestClassifier(30, random_state=0),
                  GradientBoostingClassifier(n_estimators=30, random_state=0), LogisticRegression(max_iter=500),
                  HistGradientBoostingClassifier(max_iter=30, random_state=0)):
        finding = check_tensors(estimator_arrays(model.fit(x, y)), needles)
        assert finding.checked_tensors > 0
        assert finding.reproduces == [], f"{type(model).__name__} tripped the weights check: {finding.reproduces}"
    stored = check_tensors(estimator_arrays(KNeighborsClassifier(1).fit(x, y)), needles)
    assert {(r.tensor, r.what) for r in stored.reproduces} >= {("model._fit_X", "row")}, \
        "a nearest-neighbour model's stored rows were not found"


def test_windows_across_chunk_boundaries_are_found(train: np.ndarray, needles: TrainingNeedles,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_CHUNK", 64)
    sequence = np.random.default_rng(4).normal(size=1000)
    sequence[60:70] = train[9]  # straddles the first boundary
    assert found({"long": sequence}, needles) == {("long", "row", "exact")}


def test_short_rows_are_matched_whole_and_the_element_budget_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic(200)[:, [2, 3, 4]]  # three continuous features: a row is matched as a whole
    needles = TrainingNeedles(data)
    holder = np.zeros(50)
    holder[10:13] = data[5]
    partial = np.zeros(50)
    partial[10:12] = data[5, :2]
    assert found({"holder": holder, "partial": partial}, needles) == {("holder", "row", "exact")}
    monkeypatch.setattr(weights, "MAX_ELEMENTS", 60)
    finding = check_tensors({"holder": holder, "too_big": np.zeros(100)}.items(), needles)
    assert (finding.checked_tensors, finding.skipped_tensors) == (1, 1)


def test_needle_windows_need_three_distinct_values() -> None:
    lines = np.array([[0, 1, 0, 1, 2, 2, 2, 2], [5, 5, 5, 5, np.nan, 1, 2, 3]], dtype=np.float64)
    informative = weights.informative_windows(lines, 3)
    assert informative.tolist() == [[False, False, True, False, False, False],
                                    [False, False, False, False, False, True]]
