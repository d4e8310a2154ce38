"""The export child: imports the buyer's model, builds it and writes its graph for the trainer to check.

    python -I -m sandbox_trainer.export CODE_DIR MODULE_FILE N_FEATURES N_OUTPUTS OUT_DIR [INPUT_SHAPE]

INPUT_SHAPE ("1x64x64": channels x height x width) is given for image datasets: the model then takes input
(rows, channels, height, width), and `build_model` is called as `build_model(n_features, n_outputs,
input_shape=(channels, height, width))` if it accepts an `input_shape` argument (n_features is then
channels x height x width), else as `build_model(n_features, n_outputs)`.

This is the only process that runs buyer code, and it runs before any data is in the container; the
trainer (`sandbox_trainer.run`) kills it and everything it started before asking for the data. Nothing here
is trusted: the buyer's module can replace any of it, so the trainer reads what lands in OUT_DIR as hostile
input (`graph.load_program`). This module only has to make the honest case work and fail clearly:

- OUT_DIR/graph.json: the `torch.export` graph (training mode, dynamic batch dimension) in the JSON form of
  `graph.FORMAT`: placeholders with their kind and state_dict name, nodes as operator name + arguments;
- OUT_DIR/tensors.safetensors: the parameters, buffers and constants the graph takes.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from sandbox_trainer.graph import FORMAT, GRAPH_FILE, TENSORS_FILE

EXAMPLE_ROWS = 3


class ExportFailed(Exception):
    """The buyer's module cannot be exported; the message is for the buyer."""


def load_buyer_module(code_dir: Path, module_file: str) -> Any:
    """Import `code_dir/module_file` (its folder on sys.path, so sibling modules import too)."""
    path = code_dir / module_file
    if not path.is_file():
        raise ExportFailed(f"{module_file} is not in the bundle")
    sys.path.insert(0, str(code_dir))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ExportFailed(f"{module_file} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def build(module: Any, n_features: int, n_outputs: int, input_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    """`module.build_model(n_features, n_outputs)`, with `input_shape=` for images if it takes it; checked to be
    an nn.Module."""
    build_model = getattr(module, "build_model", None)
    if not callable(build_model):
        raise ExportFailed("the model file must define build_model(n_features, n_outputs) -> torch.nn.Module")
    if input_shape is not None and _takes_input_shape(build_model):
        model = build_model(n_features, n_outputs, input_shape=input_shape)
    else:
        model = build_model(n_features, n_outputs)
    if not isinstance(model, torch.nn.Module):
        raise ExportFailed(f"build_model returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _takes_input_shape(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "input_shape" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def parse_input_shape(text: str) -> tuple[int, ...]:
    """"1x64x64" -> (1, 64, 64)."""
    shape = tuple(int(part) for part in text.split("x"))
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"input shape {text!r} is not sizes joined by 'x'")
    return shape


def export_model(model: torch.nn.Module, input_shape: int | tuple[int, ...]) -> ExportedProgram:
    """The training-mode graph of `model` on float32 input (rows, *input_shape) (or (rows, n_features) for an
    int), rows dynamic."""
    model.train()  # dropout stays in the graph; the trainer runs it in training mode
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    example = torch.randn(EXAMPLE_ROWS, *shape)
    return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("rows")},))


def serialise(program: ExportedProgram, model: torch.nn.Module) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The graph as `graph.FORMAT` JSON, and the tensors its placeholders name."""
    inputs: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer", InputKind.CONSTANT_TENSOR: "constant",
             InputKind.USER_INPUT: "input"}
    for spec in program.graph_signature.input_specs:
        kind = kinds.get(spec.kind, f"unsupported:{spec.kind.name}")
        entry: dict[str, Any] = {"name": spec.arg.name, "kind": kind}
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            assert spec.target is not None
            entry["target"] = spec.target
            in_state_dict = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
            source = program.state_dict if in_state_dict else program.constants
            tensors[spec.target] = source[spec.target].detach().clone().contiguous()
            if spec.kind == InputKind.BUFFER:
                entry["persistent"] = bool(spec.persistent)
        inputs.append(entry)
    mutations = [spec.target for spec in program.graph_signature.output_specs
                 if spec.kind != OutputKind.USER_OUTPUT]
    nodes: list[dict[str, Any]] = []
    output: Any = None
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = _encode(node.args[0])
            continue
        nodes.append({"name": node.name, "op": node.op, "target": _target_name(node.target),
                      "args": [_encode(arg) for arg in node.args],
                      "kwargs": {key: _encode(value) for key, value in node.kwargs.items()}})
    graph = {"format": FORMAT, "inputs": inputs, "nodes": nodes, "output": output, "mutations": mutations,
             "state_dict": _state_dict_targets(model, set(tensors))}
    return json.dumps(graph).encode(), tensors


def _state_dict_targets(model: torch.nn.Module, exported: set[str]) -> dict[str, str]:
    """Each state_dict key -> the exported tensor it is: the same name where torch.export kept it (it keeps
    tied weights under each name, so they train as separate tensors), else the exported name of the same
    tensor object."""
    by_object: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in exported:
            by_object.setdefault(id(tensor), name)
    return {key: key if key in exported else by_object.get(id(value), key)
            for key, value in model.state_dict(keep_vars=True).items()}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.linear.default"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{getattr(target, '_name', '?')}"
    module = getattr(target, "__module__", None) or "?"
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    return {"unsupported": type(value).__name__}


def main(argv: list[str]) -> int:
    if len(argv) not in (5, 6):
        print("usage: python -I -m sandbox_trainer.export CODE_DIR MODULE N_FEATURES N_OUTPUTS OUT_DIR "
              "[INPUT_SHAPE]", file=sys.stderr)
        return 2
    code_dir, module_file, n_features, n_outputs, out_dir = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), \
        Path(argv[4])
    input_shape = parse_input_shape(argv[5]) if len(argv) == 6 else None
    try:
        model = build(load_buyer_module(code_dir, module_file), n_features, n_outputs, input_shape)
        program = export_model(model, input_shape or n_features)
        graph, tensors = serialise(program, model)
    except ExportFailed as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    (out_dir / GRAPH_FILE).write_bytes(graph)
    safetensors.torch.save_file(tensors, str(out_dir / TENSORS_FILE))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
