"""Hostile: skips the real export and writes a graph that reads a file with aten.from_file."""

import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    out = Path(sys.argv[-1])  # the export folder the trainer gave the child
    graph = {
        "format": "sandbox-trainer-graph/1",
        "inputs": [{"name": "p_w", "kind": "parameter", "target": "w"}, {"name": "x", "kind": "input"}],
        "nodes": [
            {"name": "secret", "op": "call_function", "target": "aten.from_file.default",
             "args": ["/etc/hostname", False, 8], "kwargs": {}},
            {"name": "out", "op": "call_function", "target": "aten.linear.default",
             "args": [{"node": "x"}, {"node": "p_w"}], "kwargs": {}},
        ],
        "output": [{"node": "out"}],
        "mutations": [],
        "state_dict": {"w": "w"},
    }
    (out / "graph.json").write_text(json.dumps(graph))
    safetensors.torch.save_file({"w": torch.zeros(n_outputs, n_features)}, str(out / "tensors.safetensors"))
    print("wrote a forged graph")
    sys.stdout.flush()
    os._exit(0)
