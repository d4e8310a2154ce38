"""A bundle whose model file forgot build_model."""

import torch

MODEL = torch.nn.Linear(4, 2)
