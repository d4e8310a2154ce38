"""Training throughput: non-private SGD, Opacus (hooks), Opacus ghost clipping and the platform's DP-SGD trainer.

Run: .venv/bin/python bench/training.py [--quick] [--device cuda] [--models mlp,cnn] [--repeats 3]

Side by side in one run, on the same model, data and batch size, samples per second of training for:
- non-private SGD: an nn.Module, torch.optim.SGD, shuffled fixed-size batches, mean cross-entropy;
- Opacus 1.6 with hooks (`PrivacyEngine.make_private(..., grad_sample_mode="hooks")`): per-sample gradients
  materialised by module hooks, Poisson sampling, flat clipping, noise (the Poisson batches are drawn by
  tensor indexing, not by Opacus' DataLoader, whose per-row __getitem__ would dominate on tabular data);
- Opacus 1.6 ghost clipping (`make_private(..., criterion=..., grad_sample_mode="ghost")`, which wraps the
  criterion so that `loss.backward()` runs its two backward passes);
- the platform trainer (`images/training/sandbox_trainer`): the model exported as a buyer's would be, loaded
  by the trainer's graph checker, and trained by `dpsgd.train` with one row per privacy unit (Poisson
  sampling of units, per-unit clipping, noise, RDP accounting each step). It reports which clipping path
  the graph took ("bookkeeping" or "vmap").
Models: "mlp", the registry's tabular shape (12 features, hidden 128-128, 2 classes, batch 1024, 50,000
rows) and "cnn", a small CNN on synthetic 28x28 images (two 3x3 convolutions with 16 and 32 channels, max
pooling, a linear head to 10 classes; batch 256, 10,000 rows).
Each method trains `--steps` steps after a warm-up; the methods take turns for `--repeats` short rounds,
the first to go rotating, so that load from elsewhere on a shared machine slows them alike. The median
round is reported with its ratio to non-private SGD, in wall-clock time and in this process's CPU time (less
sensitive to other work on the machine). The CPU is always measured; `--device cuda` adds the GPU where
torch sees one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "images" / "training"))

from opacus import PrivacyEngine  # noqa: E402
from sandbox_trainer import dpsgd, export  # noqa: E402
from sandbox_trainer.graph import load_program  # noqa: E402

NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.05


@dataclass(frozen=True)
class Workload:
    name: str
    rows: int
    n_features: int
    n_outputs: int
    batch_size: int
    steps: int
    quick_steps: int
    build: Callable[[], nn.Module]


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 16, 3, padding=1)
        self.second = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.first(x.view(-1, 1, 28, 28))), 2)
        x = torch.max_pool2d(torch.relu(self.second(x)), 2)
        return self.head(torch.flatten(x, 1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))


WORKLOADS = {
    "mlp": Workload("mlp", rows=50_000, n_features=12, n_outputs=2, batch_size=1024, steps=40, quick_steps=20,
                    build=mlp),
    "cnn": Workload("cnn", rows=10_000, n_features=784, n_outputs=10, batch_size=256, steps=5, quick_steps=3,
                    build=SmallCnn),
}


def synthetic_data(workload: Workload, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(workload.rows, workload.n_features, generator=generator)
    direction = torch.randn(workload.n_features, workload.n_outputs, generator=generator)
    y = (x @ direction).argmax(dim=1)
    return x.to(device), y.to(device)


def fresh_model(workload: Workload, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return workload.build().to(device)


# The methods: each prepares once, then `step_block(steps)` trains and returns the samples it processed. ---

class NonPrivate:
    name = "non-private SGD"

    def __init__(self, workload: Workload, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        self.model = fresh_model(workload, device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.x, self.y, self.batch = x, y, workload.batch_size
        self.order = torch.randperm(len(x), device=device)
        self.position = 0

    def step_block(self, steps: int) -> int:
        for _ in range(steps):
            if self.position + self.batch > len(self.order):
                self.order, self.position = torch.randperm(len(self.x), device=self.x.device), 0
            index = self.order[self.position:self.position + self.batch]
            self.position += self.batch
            self.optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(self.x[index]), self.y[index]).backward()
            self.optimizer.step()
        return steps * self.batch


class OpacusMethod:
    def __init__(self, workload: Workload, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 mode: str) -> None:
        self.name = f"Opacus {mode}"
        self.mode = mode
        model = fresh_model(workload, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=workload.batch_size)
        engine = PrivacyEngine()
        common: dict[str, Any] = {"module": model, "optimizer": optimizer, "data_loader": loader,
                                  "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
                                  "poisson_sampling": True, "grad_sample_mode": mode}
        if mode == "ghost":
            self.model, self.optimizer, self.criterion, self.loader = engine.make_private(
                criterion=nn.CrossEntropyLoss(), **common)
        else:
            self.model, self.optimizer, self.loader = engine.make_private(**common)
            self.criterion = nn.CrossEntropyLoss()
        # Opacus' DataLoader draws its Poisson batches one __getitem__ per row, which on this tabular data costs
        # more than the training: the batches are drawn here instead, with the same sample rate, by indexing.
        self.x, self.y, self.rate = x, y, workload.batch_size / len(x)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.nonzero(torch.rand(len(self.x), device=self.x.device) < self.rate).squeeze(1)
        return self.x[chosen], self.y[chosen]

    def step_block(self, steps: int) -> int:
        samples = 0
        for _ in range(steps):
            x, y = self._next()
            samples += len(x)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
        return samples


class _Counting:
    """A clipper that counts the rows it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.rows = inner, inner.name, 0

    def clipped_sum(self, parameters: dict[str, torch.Tensor], batch: dpsgd.UnitBatch) -> dpsgd.ClipResult:
        self.rows += batch.x.shape[0]
        return self.inner.clipped_sum(parameters, batch)  # type: ignore[no-any-return]


class Platform:
    def __init__(self, workload: Workload, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        model = fresh_model(workload, torch.device("cpu"))
        graph, tensors = export.serialise(export.export_model(model, workload.n_features), model)
        self.program = load_program(graph, safetensors.torch.save(tensors)).to(device)
        units = len(x)
        self.rows = dpsgd.UnitRows(x, y, torch.arange(units, device=device), n_units=units, max_rows_per_unit=1)
        self.config = dpsgd.DpSgdConfig(task="classification", n_outputs=workload.n_outputs,
                                        learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM,
                                        noise_multiplier=NOISE_MULTIPLIER, sample_rate=workload.batch_size / units,
                                        steps=1, n_units=units, max_rows_per_unit=1, delta=1e-5)
        clipper, fallback, why = dpsgd.choose_clipper(self.program, workload.n_features, self.config)
        self.clipper = _Counting(clipper)
        # Each step samples, clips, adds noise and steps the RDP accountant; the epsilon a run reports
        # (once at its end, and with each progress report) is not part of the per-step cost measured here.
        self.trainer = dpsgd.DpSgd(self.program, self.rows, self.config, clipper=self.clipper, fallback=fallback,
                                   seed=1)
        self.name = f"platform trainer ({clipper.name})"
        self.why = why

    def step_block(self, steps: int) -> int:
        before = self.clipper.rows
        for _ in range(steps):
            self.trainer.step()
        return self.clipper.rows - before


# Measuring ---------------------------------------------------------------------------------------------

@dataclass
class Timing:
    name: str
    rates: list[float] = field(default_factory=list)       # samples per wall-clock second, one per round
    cpu_rates: list[float] = field(default_factory=list)   # samples per second of this process's CPU time

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_rate(self) -> float:
        return statistics.median(self.cpu_rates)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(workload: Workload, device: torch.device, *, steps: int, warmup: int, repeats: int) -> list[Timing]:
    x, y = synthetic_data(workload, device)
    methods: list[Any] = [NonPrivate(workload, x, y, device), OpacusMethod(workload, x, y, device, "hooks"),
                          OpacusMethod(workload, x, y, device, "ghost"), Platform(workload, x, y, device)]
    timings = [Timing(method.name) for method in methods]
    for method in methods:
        method.step_block(warmup)
    pairs = list(zip(methods, timings, strict=True))
    for round_index in range(repeats):
        # Rotate who goes first, so that a burst of load elsewhere does not always land on the same method.
        shift = round_index % len(pairs)
        for method, timing in pairs[shift:] + pairs[:shift]:
            synchronise(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            samples = method.step_block(steps)
            synchronise(device)
            timing.rates.append(samples / (time.perf_counter() - started))
            timing.cpu_rates.append(samples / max(1e-9, time.process_time() - cpu_started))
    platform = methods[-1]
    if platform.why:
        print(f"  (platform: vmap path because {platform.why})")
    return timings


def report(workload: Workload, device: torch.device, timings: list[Timing], steps: int, repeats: int) -> None:
    baseline, cpu_baseline = timings[0].rate, timings[0].cpu_rate
    print(f"\n{workload.name} on {device.type} (batch {workload.batch_size}, {steps} steps x {repeats} rounds, "
          f"{torch.get_num_threads()} threads; medians over rounds):")
    print(f"  {'method':34} {'samples/s':>12} {'vs non-private':>15} {'CPU-time ratio':>15}  wall range")
    for timing in timings:
        spread = f"[{min(timing.rates):,.0f} .. {max(timing.rates):,.0f}]" if len(timing.rates) > 1 else ""
        print(f"  {timing.name:34} {timing.rate:12,.0f} {baseline / timing.rate:14.2f}x "
              f"{cpu_baseline / timing.cpu_rate:14.2f}x  {spread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: measure on the GPU too (the CPU is always measured)")
    parser.add_argument("--models", default="mlp,cnn", help="comma list of: " + ", ".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 12, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default per model)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(Optimal order|Secure RNG|Full backward hook).*")
    devices = [torch.device("cpu")]
    if args.device == "cuda":
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        else:
            print("--device cuda: torch sees no GPU here; measuring the CPU only")
    repeats = args.repeats or (3 if args.quick else 12)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for name in args.models.split(","):
        workload = WORKLOADS[name]
        steps = args.steps or (workload.quick_steps if args.quick else workload.steps)
        warmup = max(2, steps // 10)
        for device in devices:
            timings = measure(workload, device, steps=steps, warmup=warmup, repeats=repeats)
            report(workload, device, timings, steps, repeats)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other work on this machine slows every method)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
