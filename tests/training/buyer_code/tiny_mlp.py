"""An honest buyer model: a small MLP (prints a line while it is built)."""

import torch


def build_model(n_features: int, n_outputs: int) -> torch.nn.Module:
    print(f"building a tiny MLP for {n_features} features")
    return torch.nn.Sequential(torch.nn.Linear(n_features, 8), torch.nn.ReLU(), torch.nn.Linear(8, n_outputs))
