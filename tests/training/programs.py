"""Buyer-like torch modules as the trainer sees them: exported by the export child's code, loaded by `graph`."""

from __future__ import annotations

import safetensors.torch
import torch
from sandbox_trainer import export
from sandbox_trainer.graph import Program, load_program


def exported(module: torch.nn.Module, n_features: int) -> tuple[bytes, bytes]:
    """The two files the export child writes for `module`: graph JSON and safetensors bytes."""
    graph, tensors = export.serialise(export.export_model(module, n_features), module)
    return graph, safetensors.torch.save(tensors)


def program_of(module: torch.nn.Module, n_features: int) -> Program:
    return load_program(*exported(module, n_features))


class SmallCnn(torch.nn.Module):
    """8x8 single-channel images as 64 features: conv, pool, conv, layer norm, linear."""

    def __init__(self, n_outputs: int = 3) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.second = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.norm = torch.nn.LayerNorm(6 * 2 * 2)
        self.head = torch.nn.Linear(6 * 2 * 2, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.first(x.view(-1, 1, 8, 8))), 2)
        x = torch.tanh(self.second(x))
        return self.head(self.norm(torch.flatten(x, 1)))


def small_mlp(n_features: int = 6, n_outputs: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(n_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.GELU(), torch.nn.Linear(16, n_outputs))
