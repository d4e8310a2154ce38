"""An honest buyer CNN for image datasets: takes (rows, channels, height, width) and the image shape."""

import torch


def build_model(n_features, n_outputs, input_shape=(1, 16, 16)):
    channels, height, width = input_shape
    print(f"building a small CNN for {channels}x{height}x{width} images ({n_features} values)")
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * (height // 4) * (width // 4), n_outputs))
