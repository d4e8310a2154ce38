"""Model files a buyer's job wrote, opened without running anything they hold.

Each format is read the one way that cannot run code from the file:
- skops: only types the platform trusts (skops' defaults, and a fixed list of scikit-learn's own
  compiled tree and neighbour structures), checked before loading and validated after it;
- ONNX: self-contained files only (no external data), evaluated by `onnx.reference`, pure NumPy;
- safetensors: tensors only, through the safetensors library (there is nothing to run).
Pickles, `torch.save` files and joblib files run code when loaded: they are named and refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

import numpy as np

MAX_MODEL_BYTES = 512 * 1024 * 1024
_BATCH_ROWS = 2048
_MAX_WALK_OBJECTS = 200_000
_MAX_WALK_DEPTH = 24

# scikit-learn's own compiled structures, which skops 0.16 does not trust by default although every
# tree or neighbour model holds one. Loading them runs only scikit-learn's code; their contents are
# validated below before anything is predicted (trees), or they are not used at all (neighbours).
PLATFORM_TRUSTED_TYPES = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
})

BARE_WEIGHTS = "a bare safetensors file has no architecture to query; export ONNX or skops for the attacks"


class ModelFormat(StrEnum):
    SKOPS = "skops"
    ONNX = "onnx"
    SAFETENSORS = "safetensors"
    PICKLE = "pickle"
    TORCH = "torch"
    JOBLIB = "joblib"
    UNKNOWN = "unknown"


RUNS_CODE = {
    ModelFormat.PICKLE: "a pickle runs code when it is loaded, so the gate does not open it",
    ModelFormat.TORCH: "a torch.save file is a pickle (in a zip) and runs code when it is loaded, so the gate "
                       "does not open it",
    ModelFormat.JOBLIB: "a joblib file is a pickle and runs code when it is loaded, so the gate does not open it",
}
ADVICE = "; save models as skops, ONNX or safetensors"


class ModelRefused(Exception):
    """The file is not opened (or not used) as a model, for `reason`; nothing in it ran."""

    def __init__(self, model_format: ModelFormat, reason: str, untrusted_types: list[str] | None = None) -> None:
        super().__init__(reason)
        self.format = model_format
        self.reason = reason  # fixed text: nothing the file chose, so it may be shown anywhere
        self.untrusted_types = untrusted_types or []  # named by the file: for the steward's report only


@dataclass
class LoadedModel:
    """What the gate may use of a model: its tensors for the weights check, and where possible a way to query
    it (`predict_proba` for classifiers, `predict` for regressors) for the attacks."""

    format: ModelFormat
    tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)
    predict_proba: Callable[[np.ndarray], np.ndarray] | None = None
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    estimator: Any = None  # a scikit-learn estimator, which LiRA can retrain as shadow models
    classes: np.ndarray | None = None  # the classes predict_proba's columns stand for, where the file says
    not_runnable: str | None = None  # why the attacks cannot query it


# --- Recognising a file by its bytes ------------------------------------------------------------

_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".torch"}
_JOBLIB_SUFFIXES = {".joblib", ".jbl"}
_COMPRESSED = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
               b"\x04\x22\x4d\x18", b"ZF")


def _zip_names(data: bytes) -> list[str] | None:
    import io
    import zipfile

    if not data.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return []


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 2 <= header <= len(data) - 8 and data[8:9] == b"{"


def sniff(data: bytes, name: str) -> ModelFormat:
    """The file's format, from its content first and its name second."""
    suffix = PurePosixPath(name).suffix.lower()
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        if suffix in _TORCH_SUFFIXES:
            return ModelFormat.TORCH
        return ModelFormat.JOBLIB if suffix in _JOBLIB_SUFFIXES else ModelFormat.PICKLE
    names = _zip_names(data)
    if names is not None:
        if any(n == "data.pkl" or n.endswith("/data.pkl") or n.endswith(".pkl") for n in names):
            return ModelFormat.TORCH
        return ModelFormat.SKOPS if "schema.json" in names else ModelFormat.UNKNOWN
    if suffix in _JOBLIB_SUFFIXES or (suffix in {".pkl", ".pickle"} and data.startswith(_COMPRESSED)):
        return ModelFormat.JOBLIB
    if suffix in {".pkl", ".pickle", ".p"}:
        return ModelFormat.PICKLE
    if suffix in _TORCH_SUFFIXES:
        return ModelFormat.TORCH
    if _is_safetensors(data):
        return ModelFormat.SAFETENSORS
    if suffix == ".onnx":
        return ModelFormat.ONNX
    return ModelFormat.UNKNOWN


def safe_text(text: str, limit: int = 80) -> str:
    """A name from the file, cut to what a report can show: no data fits in it unnoticed."""
    return re.sub(r"[^A-Za-z0-9_.:/\[\]-]", "_", text)[:limit]


def load_model(data: bytes, name: str, *, task: str) -> LoadedModel:
    """Open one model file's bytes as its format allows; ModelRefused says why not."""
    if len(data) > MAX_MODEL_BYTES:
        raise ModelRefused(ModelFormat.UNKNOWN, f"the file is over the gate's {MAX_MODEL_BYTES >> 20} MiB limit")
    found = sniff(data, name)
    if found in RUNS_CODE:
        raise ModelRefused(found, RUNS_CODE[found] + ADVICE)
    if found is ModelFormat.UNKNOWN:
        raise ModelRefused(found, "the file is not a skops, ONNX or safetensors model" + ADVICE)
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    if suffix != found.value:
        raise ModelRefused(found, f"the file holds a {found.value} model but is named .{safe_text(suffix, 16)}")
    if found is ModelFormat.SKOPS:
        return _load_skops(data, task=task)
    if found is ModelFormat.ONNX:
        return _load_onnx(data, task=task)
    return _load_safetensors(data)


# --- skops ---------------------------------------------------------------------------------------

def _load_skops(data: bytes, *, task: str) -> LoadedModel:
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as exc:
        raise ModelRefused(ModelFormat.SKOPS, f"the skops archive cannot be read ({type(exc).__name__})") from exc
    refused = sorted(set(untrusted) - PLATFORM_TRUSTED_TYPES)
    if refused:
        raise ModelRefused(ModelFormat.SKOPS, f"the skops file needs {len(refused)} types the gate does not trust "
                                              "(named in the report's untrusted_types)",
                           [safe_text(t) for t in refused[:10]])
    try:
        estimator = skops.io.loads(data, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelRefused(ModelFormat.SKOPS, f"the skops file does not load ({type(exc).__name__})") from exc
    _make_safe_to_query(estimator)
    model = LoadedModel(ModelFormat.SKOPS, tensors=list(estimator_arrays(estimator)), estimator=estimator)
    from sklearn.base import BaseEstimator

    if not isinstance(estimator, BaseEstimator):
        model.not_runnable = "the skops file holds no scikit-learn estimator to query"
    elif task == "classification":
        if not hasattr(estimator, "predict_proba"):
            model.not_runnable = "the estimator has no predict_proba to attack"
        else:
            model.predict_proba = estimator.predict_proba
            classes = getattr(estimator, "classes_", None)
            model.classes = np.asarray(classes) if classes is not None else None
    elif hasattr(estimator, "predict"):
        model.predict = estimator.predict
    else:
        model.not_runnable = "the estimator has no predict to attack"
    return model


def _walk(root: Any) -> Iterator[Any]:
    """Every object reachable from an estimator through attributes, containers and object arrays."""
    stack: list[tuple[Any, int]] = [(root, 0)]
    seen: set[int] = set()
    alive: list[Any] = []  # what was seen stays referenced, so that no new object takes a seen id
    while stack and len(seen) < _MAX_WALK_OBJECTS:
        obj, depth = stack.pop()
        if id(obj) in seen or depth > _MAX_WALK_DEPTH:
            continue
        seen.add(id(obj))
        alive.append(obj)
        yield obj
        if isinstance(obj, dict):
            children: list[Any] = list(obj.values())
        elif isinstance(obj, list | tuple):
            children = list(obj)
        elif isinstance(obj, np.ndarray) and obj.dtype == object:
            children = list(obj.ravel()[:_MAX_WALK_OBJECTS])
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            children = list(vars(obj).values())
        else:
            children = []
        stack.extend((child, depth + 1) for child in children)


def _make_safe_to_query(estimator: Any) -> None:
    """Validate the compiled structures a prediction walks without bounds checks, or refuse the model.

    A tree whose child indices point anywhere, or back up the tree, would read outside its arrays or loop
    for ever; neighbour models are switched to brute force so that their stored search tree is never used.
    """
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
    from sklearn.neighbors._base import NeighborsBase
    from sklearn.tree._tree import Tree

    for obj in _walk(estimator):
        if isinstance(obj, Tree):
            state = obj.__getstate__()
            nodes = np.asarray(state["nodes"])
            if nodes.shape != (int(state["node_count"]),) or np.asarray(state["values"]).shape[0] != nodes.shape[0]:
                raise ModelRefused(ModelFormat.SKOPS, "a decision tree's arrays disagree on its size")
            _check_tree(nodes["left_child"], nodes["right_child"], nodes["feature"], nodes["left_child"] == -1,
                        int(obj.n_features))
        elif isinstance(obj, TreePredictor):
            nodes = np.asarray(obj.nodes)
            if nodes.dtype != np.dtype(PREDICTOR_RECORD_DTYPE) or nodes.ndim != 1:
                raise ModelRefused(ModelFormat.SKOPS, "a histogram gradient-boosting tree has an unknown layout")
            if nodes["is_categorical"].any():
                raise ModelRefused(ModelFormat.SKOPS, "categorical splits in histogram gradient boosting are not "
                                                      "supported by the gate")
            _check_tree(nodes["left"].astype(np.int64), nodes["right"].astype(np.int64), nodes["feature_idx"],
                        nodes["is_leaf"].astype(bool), None)
        elif isinstance(obj, NeighborsBase) and hasattr(obj, "_fit_X"):
            obj._fit_method = "brute"
            obj._tree = None
        _check_widths(obj)


def _check_widths(obj: Any) -> None:
    """A tree reads as many features as its estimator is given, and so do a forest's or a gradient-boosting
    model's trees: those ensembles call their trees without checking the input again."""
    from sklearn.ensemble._forest import BaseForest
    from sklearn.ensemble._gb import BaseGradientBoosting
    from sklearn.tree._tree import Tree

    width = vars(obj).get("n_features_in_") if hasattr(obj, "__dict__") else None
    if not isinstance(width, int):
        return
    tree = vars(obj).get("tree_")
    if isinstance(tree, Tree) and int(tree.n_features) != width:
        raise ModelRefused(ModelFormat.SKOPS, "a tree reads a different number of features than its estimator")
    if isinstance(obj, BaseForest | BaseGradientBoosting):
        for member in np.asarray(vars(obj).get("estimators_", []), dtype=object).ravel():
            if getattr(member, "n_features_in_", None) != width:
                raise ModelRefused(ModelFormat.SKOPS, "an ensemble's trees read a different number of features")


def _check_tree(left: np.ndarray, right: np.ndarray, feature: np.ndarray, leaf: np.ndarray,
                n_features: int | None) -> None:
    """Every split's children come after it and inside the tree, and it splits on a real feature."""
    count = left.shape[0]
    index = np.arange(count)
    inner = ~leaf
    children_ok = ((left[inner] > index[inner]) & (left[inner] < count)
                   & (right[inner] > index[inner]) & (right[inner] < count)).all()
    features_ok = (feature[inner] >= 0).all() and (n_features is None or (feature[inner] < n_features).all())
    if count == 0 or not children_ok or not features_ok:
        raise ModelRefused(ModelFormat.SKOPS, "a tree in the model points outside itself or back up the tree")


def estimator_arrays(estimator: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Every numeric array (and list of numbers) an estimator holds, named by the path to it."""
    from sklearn.tree._tree import Tree

    stack: list[tuple[str, Any, int]] = [("model", estimator, 0)]
    seen: set[int] = set()
    alive: list[Any] = []  # what was seen stays referenced, so that no new object takes a seen id
    while stack and len(seen) < _MAX_WALK_OBJECTS:
        name, obj, depth = stack.pop()
        if id(obj) in seen or depth > _MAX_WALK_DEPTH:
            continue
        seen.add(id(obj))
        alive.append(obj)
        if isinstance(obj, np.ndarray):
            if obj.dtype.names:
                for field_name in obj.dtype.names:
                    stack.append((f"{name}.{field_name}", np.asarray(obj[field_name]), depth + 1))
            elif obj.dtype == object:
                stack.extend((f"{name}[{i}]", item, depth + 1) for i, item in enumerate(obj.ravel()[:10_000]))
            elif obj.dtype.kind in "fiu":
                yield name, obj
        elif isinstance(obj, Tree):
            state = obj.__getstate__()
            stack.append((f"{name}.nodes", np.asarray(state["nodes"]), depth + 1))
            stack.append((f"{name}.values", np.asarray(state["values"]), depth + 1))
        elif isinstance(obj, dict):
            stack.extend((f"{name}[{str(key)[:40]}]", value, depth + 1) for key, value in obj.items())
        elif isinstance(obj, list | tuple):
            numbers = [v for v in obj if isinstance(v, int | float | np.number) and not isinstance(v, bool)]
            if obj and len(numbers) == len(obj):
                yield name, np.asarray(numbers, dtype=np.float64)
            else:
                stack.extend((f"{name}[{i}]", item, depth + 1) for i, item in enumerate(obj[:10_000]))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend((f"{name}.{key}", value, depth + 1) for key, value in vars(obj).items())


# --- ONNX ----------------------------------------------------------------------------------------

def _onnx_tensors(graph: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every TensorProto in a graph: initializers, sparse initializers, and constants in nodes and subgraphs."""
    import onnx

    for tensor in graph.initializer:
        yield prefix + tensor.name, tensor
    for sparse in graph.sparse_initializer:
        yield prefix + sparse.values.name, sparse.values
        yield prefix + sparse.values.name + ".indices", sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            where = f"{prefix}{node.name or node.op_type}.{attribute.name}"
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield where, attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from ((f"{where}[{i}]", t) for i, t in enumerate(attribute.tensors))
            elif attribute.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield where, attribute.sparse_tensor.values
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_tensors(attribute.g, where + "/")
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for i, subgraph in enumerate(attribute.graphs):
                    yield from _onnx_tensors(subgraph, f"{where}[{i}]/")


def _all_onnx_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    yield from _onnx_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.type == 4:  # TENSOR
                    yield f"{function.name}/{node.name}.{attribute.name}", attribute.t


def _numbers_in(text: str) -> np.ndarray:
    """The numbers written in a piece of text: data hidden in metadata is checked like a tensor."""
    found = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text[:1_000_000])
    return np.asarray([float(n) for n in found], dtype=np.float64)


def _load_onnx(data: bytes, *, task: str) -> LoadedModel:
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise ModelRefused(ModelFormat.ONNX, f"the ONNX file cannot be parsed ({type(exc).__name__})") from exc
    tensors = list(_all_onnx_tensors(model))
    external = [name for name, t in tensors
                if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0]
    if external:
        raise ModelRefused(ModelFormat.ONNX, f"the ONNX file keeps {len(external)} tensors in external data; the "
                                             "gate reads only self-contained files")
    arrays: list[tuple[str, np.ndarray]] = []
    for name, tensor in tensors:
        try:
            arrays.append((name, numpy_helper.to_array(tensor)))
        except Exception as exc:
            raise ModelRefused(ModelFormat.ONNX, f"an ONNX tensor cannot be read ({type(exc).__name__})") from exc
    text = " ".join([model.doc_string, model.graph.doc_string, *(p.value for p in model.metadata_props)])
    if text.strip():
        arrays.append(("metadata", _numbers_in(text)))
    loaded = LoadedModel(ModelFormat.ONNX, tensors=arrays)
    runner = _onnx_runner(model)
    if isinstance(runner, str):
        loaded.not_runnable = runner
    elif task == "classification":
        loaded.predict_proba = lambda features: _probabilities(runner(features))
    else:
        loaded.predict = lambda features: _values(runner(features))
    return loaded


def _onnx_runner(model: Any) -> Callable[[np.ndarray], list[Any]] | str:
    """A function from a feature matrix to every graph output, batch by batch; or why there is none."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    known_domains = {"", "ai.onnx", "ai.onnx.ml"} | {f.domain for f in model.functions}
    unknown = {node.domain for node in model.graph.node} - known_domains
    if unknown:
        return "the ONNX graph uses operators outside the standard ONNX domains"
    initialized = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialized]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        return "the ONNX graph must take exactly one tensor input, the feature matrix"
    try:
        dtype = helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
        evaluator = ReferenceEvaluator(model)
    except Exception as exc:
        return f"the ONNX graph cannot be evaluated ({type(exc).__name__})"
    input_name = inputs[0].name

    def run(features: np.ndarray) -> list[Any]:
        batches: list[list[Any]] = [
            list(evaluator.run(None, {input_name: features[start:start + _BATCH_ROWS].astype(dtype)}))
            for start in range(0, features.shape[0], _BATCH_ROWS)]
        outputs = []
        for position in range(len(batches[0])):
            parts = [batch[position] for batch in batches]
            if all(isinstance(p, list) for p in parts):  # a sequence of maps (ZipMap): class -> probability
                rows = [row for part in parts for row in part]
                keys = sorted(rows[0]) if rows and isinstance(rows[0], dict) else []
                outputs.append(np.asarray([[row[k] for k in keys] for row in rows], dtype=np.float64))
            else:
                outputs.append(np.concatenate([np.asarray(p) for p in parts]))
        return outputs

    return run


def _probabilities(outputs: list[Any]) -> np.ndarray:
    """The class probabilities among a classifier's outputs; logits and single-column outputs converted."""
    floats = [np.asarray(o, dtype=np.float64) for o in outputs
              if isinstance(o, np.ndarray) and o.dtype.kind == "f" and o.ndim in (1, 2)]
    wide = [o for o in floats if o.ndim == 2 and o.shape[1] >= 2]
    candidates = wide or floats
    if not candidates:
        raise ValueError("the model gives no floating-point output to read as probabilities")
    scores = candidates[-1] if len(candidates) > 1 else candidates[0]
    if scores.ndim == 1 or scores.shape[1] == 1:
        column = scores.reshape(-1)
        positive = column if ((column >= 0) & (column <= 1)).all() else 1.0 / (1.0 + np.exp(-column))
        return np.column_stack([1.0 - positive, positive])
    if ((scores >= 0) & (scores <= 1)).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        return scores
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def _values(outputs: list[Any]) -> np.ndarray:
    for output in outputs:
        array = np.asarray(output)
        if array.dtype.kind == "f" and (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
            return array.reshape(-1).astype(np.float64)
    raise ValueError("the model gives no single floating-point output to read as predictions")


# --- safetensors ---------------------------------------------------------------------------------

def _load_safetensors(data: bytes) -> LoadedModel:
    from safetensors.numpy import load

    header_size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_size])
    except ValueError as exc:
        raise ModelRefused(ModelFormat.SAFETENSORS, "the safetensors header is not JSON") from exc
    if not isinstance(header, dict):
        raise ModelRefused(ModelFormat.SAFETENSORS, "the safetensors header is not a JSON object")
    try:
        tensors = sorted(load(data).items())
    except KeyError:
        # numpy has no bfloat16: safetensors' numpy reader refuses such files whole. Read them here.
        tensors = _bfloat16_tolerant(data, header, header_size)
    except Exception as exc:
        raise ModelRefused(ModelFormat.SAFETENSORS,
                           f"the safetensors file is malformed ({type(exc).__name__})") from exc
    arrays: list[tuple[str, np.ndarray]] = list(tensors)
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and metadata:
        arrays.append(("__metadata__", _numbers_in(" ".join(str(v) for v in metadata.values()))))
    return LoadedModel(ModelFormat.SAFETENSORS, tensors=arrays, not_runnable=BARE_WEIGHTS)


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1"}


def _bfloat16_tolerant(data: bytes, header: dict[str, Any], header_size: int) -> list[tuple[str, np.ndarray]]:
    """A safetensors file's tensors, bfloat16 ones widened to float32 (exactly) and unknown types skipped."""
    body = memoryview(data)[8 + header_size:]
    tensors = []
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
            if not (0 <= int(begin) <= int(end) <= len(body)):
                raise ValueError("tensor outside the file")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelRefused(ModelFormat.SAFETENSORS, "the safetensors header is malformed") from exc
        raw = body[int(begin):int(end)]
        count = int(np.prod(shape)) if shape else 1
        if dtype_name == "BF16" and len(raw) == 2 * count:
            widened = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << np.uint32(16)
            tensors.append((str(name), widened.view(np.float32).reshape(shape)))
        elif dtype_name in _SAFETENSORS_DTYPES and len(raw) == count * np.dtype(
                _SAFETENSORS_DTYPES[dtype_name]).itemsize:
            tensors.append((str(name), np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[dtype_name]).reshape(shape)))
        elif dtype_name in _SAFETENSORS_DTYPES or dtype_name == "BF16":
            raise ModelRefused(ModelFormat.SAFETENSORS, "a safetensors tensor's size does not match its shape")
    return tensors
