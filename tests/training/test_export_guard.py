"""What the trainer accepts from the export child: the child ran buyer code, so its files are hostile.

Each test is an attack on the parent process or on the privacy of training, and what it meets."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from programs import SmallCnn, exported, program_of, small_mlp
from sandbox_trainer import graph, run
from sandbox_trainer.graph import ExportRefused, NotRowwise, load_program


def forged(nodes: list[dict[str, Any]], *, inputs: list[dict[str, Any]] | None = None,
           tensors: dict[str, torch.Tensor] | None = None, output: str = "out",
           state_dict: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """A hand-written export, as buyer code could write it instead of the real one."""
    inputs = inputs if inputs is not None else [{"name": "p_w", "kind": "parameter", "target": "w"},
                                                {"name": "x", "kind": "input"}]
    tensors = tensors if tensors is not None else {"w": torch.zeros(2, 4)}
    document = {"format": graph.FORMAT, "inputs": inputs, "nodes": nodes, "output": [{"node": output}],
                "mutations": [], "state_dict": state_dict if state_dict is not None else {"w": "w"}}
    return json.dumps(document).encode(), safetensors.torch.save(tensors)


def call(name: str, target: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"name": name, "op": "call_function", "target": target, "args": list(args), "kwargs": kwargs}


def ref(name: str) -> dict[str, str]:
    return {"node": name}


LINEAR = call("out", "aten.linear.default", ref("x"), ref("p_w"))


def test_an_honest_export_computes_what_the_module_computes() -> None:
    torch.manual_seed(0)
    for module, n_features in ((small_mlp(6, 3), 6), (SmallCnn(3), 64)):
        program = program_of(module, n_features)
        x = torch.randn(5, n_features)
        torch.testing.assert_close(program.forward(program.parameters, x, rows=5), module(x))
        assert set(program.state_dict_keys) == set(module.state_dict())


def test_the_forged_minimal_graph_is_accepted() -> None:
    program = load_program(*forged([LINEAR]))
    assert program.forward(program.parameters, torch.ones(3, 4)).shape == (3, 2)


@pytest.mark.parametrize(("node", "named"), [
    (call("secret", "aten.from_file.default", "/etc/hostname", False, 8), "aten.from_file.default"),
    (call("saved", "aten.save.default", ref("x"), "/output/rows"), "aten.save.default"),
    (call("leak", "mylib.leak.default", ref("x")), "mylib.leak.default"),
    (call("noise", "aten.normal.Tensor_float", ref("x")), "aten.normal.Tensor_float"),
    (call("picked", "aten.nonzero.default", ref("x")), "aten.nonzero.default"),
    (call("mixed", "aten.batch_norm.default", ref("x"), None, None, None, None, True, 0.1, 1e-5, False),
     "aten.batch_norm.default"),
    (call("branch", "higher_order.cond", True, ref("x")), "higher_order.cond"),
    (call("py", "builtins.eval", "__import__('os').system('touch /tmp/x')"), "builtins.eval"),
    (call("written", "aten.add_.Tensor", ref("p_w"), 1.0), "writes to the model's parameter w"),
])
def test_an_operator_outside_the_allow_list_is_refused_by_name(node: dict[str, Any], named: str) -> None:
    with pytest.raises(ExportRefused, match=r"not allowed|in-place|writes to") as refused:
        load_program(*forged([node, LINEAR]))
    assert named in str(refused.value)


@pytest.mark.parametrize(("node", "why"), [
    ({"name": "sub", "op": "call_module", "target": "linear", "args": [ref("x")], "kwargs": {}}, "submodules"),
    ({"name": "attr", "op": "get_attr", "target": "w", "args": [], "kwargs": {}}, "submodules"),
    (call("cast", "aten.mul.Tensor", ref("x"), {"dtype": "float64"}), "type the trainer does not accept"),
    (call("late", "aten.relu.default", ref("later")), "not defined before"),
    (call("deep", "aten.relu.default", [[[[[[ref("x")]]]]]]), "nested too deeply"),
    (call("kw", "aten.relu.default", ref("x"), inplace=True), "unknown keyword"),
])
def test_malformed_nodes_are_refused(node: dict[str, Any], why: str) -> None:
    with pytest.raises(ExportRefused, match=why):
        load_program(*forged([node, LINEAR]))


class RemembersRows(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.register_buffer("memory", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.memory += x.sum(dim=0)
        return self.linear(x)


def test_a_model_that_writes_a_buffer_is_refused() -> None:
    with pytest.raises(ExportRefused, match="buffer memory"):
        load_program(*exported(RemembersRows(), 4))


def test_batch_norm_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    with pytest.raises(ExportRefused, match="batch norm"):
        load_program(*exported(model, 4))


class Branches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.linear(t), lambda t: -self.linear(t), (x,))


def test_a_data_dependent_branch_is_refused() -> None:
    with pytest.raises(ExportRefused, match=r"higher_order.cond|not allowed|submodules"):
        load_program(*exported(Branches(), 4))


@pytest.mark.parametrize(("change", "why"), [
    (lambda d, t: d["inputs"].append({"name": "y", "kind": "input"}), "exactly one tensor"),
    (lambda d, t: d["inputs"].insert(0, {"name": "o", "kind": "custom_obj", "target": "o"}), "kind the trainer"),
    (lambda d, t: t.update(extra=torch.zeros(1)), "never uses"),
    (lambda d, t: t.update(w=torch.zeros(2, 4, dtype=torch.float64)), "must be float32"),
    (lambda d, t: t.update(w=torch.full((2, 4), float("nan"))), "NaN"),
    (lambda d, t: d.update(state_dict={}), "not in the module's state_dict"),
    (lambda d, t: d.update(state_dict={"w": "elsewhere"}), "names no parameter"),
    (lambda d, t: d.update(mutations=["memory"]), "mutates buffers"),
    (lambda d, t: d.update(format="torch.export/pt2"), "format"),
    (lambda d, t: d.update(output=[ref("out"), ref("x")]), "exactly one tensor"),
])
def test_inconsistent_exports_are_refused(change: Any, why: str) -> None:
    document = {"format": graph.FORMAT, "inputs": [{"name": "p_w", "kind": "parameter", "target": "w"},
                                                   {"name": "x", "kind": "input"}],
                "nodes": [LINEAR], "output": [ref("out")], "mutations": [], "state_dict": {"w": "w"}}
    tensors = {"w": torch.zeros(2, 4)}
    change(document, tensors)
    with pytest.raises(ExportRefused, match=why):
        load_program(json.dumps(document).encode(), safetensors.torch.save(tensors))


def test_too_many_parameters_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "MAX_PARAMETER_ELEMENTS", 100)
    with pytest.raises(ExportRefused, match="more than 100 parameters"):
        load_program(*exported(small_mlp(6, 3), 6))


class Payload:
    """Unpickling this creates a marker file: proof that a loader ran code from the file."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickles_and_torch_archives_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    Payload.marker = str(marker)
    payload = pickle.dumps(Payload())
    archive = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(3, 4),)), str(archive))
    graph_bytes, tensor_bytes = forged([LINEAR])
    for attempt in ((payload, tensor_bytes), (graph_bytes, payload), (archive.read_bytes(), tensor_bytes),
                    (graph_bytes, torch_saved(tmp_path))):
        with pytest.raises(ExportRefused, match=r"not valid JSON|not a valid safetensors"):
            load_program(*attempt)
    assert not marker.exists(), "a pickle in the export was executed"


def torch_saved(tmp_path: Path) -> bytes:
    path = tmp_path / "tensors.pt"
    torch.save({"w": torch.zeros(2, 4), "evil": Payload()}, str(path))
    return path.read_bytes()


# The row check of the fast clipping path ----------------------------------------------------------------

class Mixer(torch.nn.Module):
    def __init__(self, mix: Any) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.mix = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.mix(x))


MIXERS = {
    "mean over rows": lambda x: x - x.mean(dim=0),
    "gram of rows": lambda x: x @ (x.t() @ x),
    "rows flattened": lambda x: x.reshape(-1).reshape(x.shape[0], 4),
    "first row broadcast": lambda x: x + x[:1],
    "rows reversed": lambda x: x.flip(0),
    "rows rolled": lambda x: torch.roll(x, 1, 0),
    "rows doubled then cut": lambda x: torch.cat([x, x], dim=0).reshape(2, -1, 4).sum(0),
    "max over rows": lambda x: x - x.amax(dim=0),
    "a dimension before the rows": lambda x: torch.nn.functional.adaptive_avg_pool1d(x.t().unsqueeze(0), 1)
    .reshape(1, 4) + x,
    "row count as a value": lambda x: x * x.shape[0],
    "softmax over rows": lambda x: torch.softmax(x, dim=0),
}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_the_row_check_refuses_graphs_that_mix_rows(name: str) -> None:
    try:
        program = program_of(Mixer(MIXERS[name]), 4)
    except ExportRefused:
        return  # refused outright (an op outside the allow-list): as good
    with pytest.raises(NotRowwise):
        program.forward(program.parameters, torch.randn(5, 4), rows=5)


def test_the_row_check_accepts_row_wise_models() -> None:
    for module, n_features in ((small_mlp(6, 3), 6), (SmallCnn(3), 64),
                               (Mixer(lambda x: torch.cat([x[:, 2:], torch.tanh(x[:, :2])], dim=1)), 4)):
        program = program_of(module, n_features)
        for rows in (1, 2, 7):
            program.forward(program.parameters, torch.randn(rows, n_features), rows=rows)


# The files the child left behind ------------------------------------------------------------------------

def export_folder(tmp_path: Path) -> tuple[Path, int]:
    folder = tmp_path / "export"
    folder.mkdir()
    return folder, os.open(folder, os.O_RDONLY | os.O_DIRECTORY)


def test_the_export_is_read_through_the_folder_opened_before_the_child(tmp_path: Path) -> None:
    folder, descriptor = export_folder(tmp_path)
    graph_bytes, tensor_bytes = forged([LINEAR])
    (folder / graph.GRAPH_FILE).write_bytes(graph_bytes)
    (folder / graph.TENSORS_FILE).write_bytes(tensor_bytes)
    folder.rename(tmp_path / "moved")               # the child swaps the folder for another
    impostor = tmp_path / "export"
    impostor.mkdir()
    (impostor / graph.GRAPH_FILE).write_bytes(b"{}")
    try:
        assert run.read_export(descriptor) == (graph_bytes, tensor_bytes)
    finally:
        os.close(descriptor)


def test_symlinks_fifos_and_oversized_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, descriptor = export_folder(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("not for the trainer")
    (folder / graph.GRAPH_FILE).symlink_to(secret)
    (folder / graph.TENSORS_FILE).write_bytes(b"x")
    try:
        with pytest.raises(ValueError, match=r"no graph.json"):
            run.read_export(descriptor)
        (folder / graph.GRAPH_FILE).unlink()
        os.mkfifo(folder / graph.GRAPH_FILE)
        finished = threading.Event()

        def attempt() -> None:
            with pytest.raises(ValueError, match="not a regular file"):
                run.read_export(descriptor)
            finished.set()

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(10)
        assert finished.is_set(), "reading a FIFO blocked the trainer"
        (folder / graph.GRAPH_FILE).unlink()
        (folder / graph.GRAPH_FILE).write_bytes(b"{" * 100)
        monkeypatch.setattr(run, "MAX_GRAPH_BYTES", 50)
        with pytest.raises(ValueError, match="larger than 50 bytes"):
            run.read_export(descriptor)
    finally:
        os.close(descriptor)


def test_wipe_removes_what_the_child_hid_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("must survive")
    work = tmp_path / "work"
    work.mkdir()
    locked = work / "locked" / "inner"
    locked.mkdir(parents=True)
    (locked / "rows.csv").write_text("hidden")
    os.chmod(locked, 0o000)
    os.chmod(work / "locked", 0o000)
    deep = work / ".deep"
    path = deep
    for _ in range(200):
        path = path / "d"
    path.mkdir(parents=True)
    (work / "link").symlink_to(outside)
    (work / "locked-link").symlink_to(outside / "keep")
    os.mkfifo(work / "pipe")
    run.wipe(work)
    assert os.listdir(work) == []
    assert (outside / "keep").read_text() == "must survive"
