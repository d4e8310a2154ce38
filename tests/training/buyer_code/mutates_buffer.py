"""Hostile: a buffer that forward changes, which would carry data into the released weights."""

import torch


class Remembers(torch.nn.Module):
    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_outputs)
        self.register_buffer("memory", torch.zeros(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.memory += x.sum(dim=0)
        return self.linear(x)


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    return Remembers(n_features, n_outputs)
