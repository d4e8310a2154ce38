"""DP-SGD per privacy unit: per-unit gradients against Opacus, clipping, the noise, sampling, and the two
clipping paths (the fast book-keeping one, and vmap over units for any graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from programs import SmallCnn, program_of, small_mlp
from sandbox_trainer import dpsgd
from sandbox_trainer.graph import NotRowwise

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CLIPPERS = {"bookkeeping": dpsgd.BookkeepingClipper, "vmap": dpsgd.VmapClipper}


def config(n_outputs: int, *, max_grad_norm: float, n_units: int, max_rows: int, task: str = "classification",
           steps: int = 1, sample_rate: float = 0.5, learning_rate: float = 0.1,
           noise_multiplier: float = 1.0) -> dpsgd.DpSgdConfig:
    return dpsgd.DpSgdConfig(task=task, n_outputs=n_outputs, learning_rate=learning_rate,
                             max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                             sample_rate=sample_rate, steps=steps, n_units=n_units, max_rows_per_unit=max_rows,
                             delta=1e-5)


def opacus_per_sample(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients of the summed cross-entropy, keyed like the module's parameters."""
    wrapped = GradSampleModule(module, loss_reduction="sum")
    torch.nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    samples = {name: parameter.grad_sample.detach().clone() for name, parameter in module.named_parameters()}
    wrapped._close()
    return samples


MODELS = {"mlp": (lambda: small_mlp(6, 3), 6), "cnn": (lambda: SmallCnn(3), 64)}


@pytest.mark.parametrize("clipper_name", sorted(CLIPPERS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("layout", ["one row per unit", "several rows per unit"])
def test_per_unit_gradients_match_opacus(clipper_name: str, model_name: str, layout: str) -> None:
    torch.manual_seed(1)
    build, n_features = MODELS[model_name]
    module = build()
    program = program_of(module, n_features)
    rows = 9
    x, y = torch.randn(rows, n_features), torch.randint(0, 3, (rows,))
    unit = torch.arange(rows) if layout == "one row per unit" else torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    units = int(unit.max()) + 1
    samples = opacus_per_sample(module, x, y)
    per_unit = {name: torch.zeros(units, *grad.shape[1:]).index_add_(0, unit, grad) for name, grad in samples.items()}
    expected_norms = torch.sqrt(sum(grad.flatten(1).square().sum(1) for grad in per_unit.values()))
    unit_rows = dpsgd.UnitRows(x, y, unit, n_units=units, max_rows_per_unit=3)
    batch = unit_rows.batch(np.arange(units))
    for max_grad_norm in (1e9, 0.3):   # no clipping, then clipping every unit
        clipper = CLIPPERS[clipper_name](program, config(3, max_grad_norm=max_grad_norm, n_units=units, max_rows=3))
        result = clipper.clipped_sum(program.parameters, batch)
        torch.testing.assert_close(result.norms, expected_norms, rtol=1e-5, atol=1e-6)
        factors = (max_grad_norm / (expected_norms + 1e-6)).clamp(max=1.0)
        for name, grad in per_unit.items():
            expected = torch.einsum("u,u...->...", factors, grad)
            torch.testing.assert_close(result.sums[name], expected, rtol=1e-4, atol=1e-6,
                                       msg=f"{name}: clipped sum differs from Opacus' (C={max_grad_norm})")
        if max_grad_norm < 1:
            assert bool((result.norms > max_grad_norm).all()), "the test must clip every unit"


def test_noise_on_zero_gradients_has_the_calibrated_scale() -> None:
    """No rows at all: every step's update is pure noise, -lr / B * N(0, (sigma C)^2) per coordinate."""
    torch.manual_seed(0)
    program = program_of(torch.nn.Linear(100, 200), 100)
    empty = dpsgd.UnitRows(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                           n_units=1000, max_rows_per_unit=1)
    cfg = config(200, max_grad_norm=0.7, n_units=1000, max_rows=1, steps=1, sample_rate=0.05,
                 learning_rate=0.2, noise_multiplier=1.3)
    clipper = dpsgd.BookkeepingClipper(program, cfg)
    result = dpsgd.train(program, empty, cfg, clipper=clipper, fallback=dpsgd.VmapClipper(program, cfg), seed=7)
    update = torch.cat([(result.parameters[name] - program.parameters[name]).flatten() for name in program.parameters])
    noise = update / (-cfg.learning_rate / cfg.expected_batch_size)
    expected_std = cfg.noise_multiplier * cfg.max_grad_norm
    assert noise.numel() == 20_200
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * expected_std


def test_poisson_sampling_has_the_sample_rate() -> None:
    rng = np.random.default_rng(3)
    n_units, rate, draws = 5000, 0.02, 3000
    sizes = np.array([len(dpsgd.poisson_units(n_units, rate, rng)) for _ in range(draws)])
    assert sizes.mean() == pytest.approx(n_units * rate, rel=0.02)
    assert sizes.var() == pytest.approx(n_units * rate * (1 - rate), rel=0.1)
    chosen = np.concatenate([dpsgd.poisson_units(n_units, rate, rng) for _ in range(draws)])
    counts = np.bincount(chosen, minlength=n_units)
    assert counts.min() >= 0 and chosen.max() < n_units
    # Each unit is chosen at the same rate: the first and last tenth of the ids are picked alike.
    assert counts[:500].mean() == pytest.approx(counts[-500:].mean(), rel=0.1)
    one = dpsgd.poisson_units(n_units, rate, rng)
    assert np.all(np.diff(one) > 0), "ids are sorted and distinct"


class MixesRows(torch.nn.Module):
    """Centres each feature over the batch: row i's output depends on every other row."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - x.mean(dim=0, keepdim=True))


def test_a_graph_that_mixes_rows_takes_the_vmap_path_and_units_stay_apart() -> None:
    program = program_of(MixesRows(), 4)
    cfg = config(2, max_grad_norm=1.0, n_units=2, max_rows=2)
    clipper, fallback, why = dpsgd.choose_clipper(program, 4, cfg)
    assert clipper.name == "vmap" and "dimension 0" in why
    x = torch.randn(4, 4)
    y, unit = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1])
    first = fallback.clipped_sum(program.parameters, dpsgd.UnitRows(x, y, unit, n_units=2, max_rows_per_unit=2)
                                 .batch(np.arange(2)))
    changed = x.clone()
    changed[2:] *= 5.0   # only unit 1's rows change
    second = fallback.clipped_sum(program.parameters, dpsgd.UnitRows(changed, y, unit, n_units=2, max_rows_per_unit=2)
                                  .batch(np.arange(2)))
    assert float(first.norms[0]) == pytest.approx(float(second.norms[0]), rel=1e-6), "unit 0 saw unit 1's rows"
    assert float(first.norms[1]) != pytest.approx(float(second.norms[1]), rel=1e-3)
    with pytest.raises(NotRowwise):
        dpsgd.BookkeepingClipper(program, cfg).clipped_sum(
            program.parameters, dpsgd.UnitRows(x, y, unit, n_units=2, max_rows_per_unit=2).batch(np.arange(2)))


class SharedWeight(torch.nn.Module):
    """One parameter used twice: the fast path's one-layer-per-parameter rule does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.weight)), self.weight)[:, :2]


def test_a_reused_parameter_takes_the_vmap_path_with_exact_gradients() -> None:
    torch.manual_seed(2)
    module = SharedWeight()
    program = program_of(module, 4)
    cfg = config(2, max_grad_norm=1e9, n_units=5, max_rows=1)
    clipper, _, why = dpsgd.choose_clipper(program, 4, cfg)
    assert clipper.name == "vmap" and "used 2 times" in why
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    result = clipper.clipped_sum(program.parameters, dpsgd.UnitRows(x, y, torch.arange(5), n_units=5,
                                                                    max_rows_per_unit=1).batch(np.arange(5)))
    for row in range(5):
        module.zero_grad()
        torch.nn.functional.cross_entropy(module(x[row:row + 1]), y[row:row + 1], reduction="sum").backward()
        assert float(result.norms[row]) == pytest.approx(float(module.weight.grad.norm()), rel=1e-5)


class HandWritten(torch.nn.Module):
    """Layers written with bare parameters: x @ W + b, addmm, an elementwise gain, then nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(6, 8) * 0.4), torch.nn.Parameter(torch.randn(8) * 0.1)
        self.w2, self.b2 = torch.nn.Parameter(torch.randn(8, 8) * 0.4), torch.nn.Parameter(torch.randn(8) * 0.1)
        self.gain = torch.nn.Parameter(1 + 0.1 * torch.randn(8))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w1 + self.b1)
        h = torch.relu(torch.addmm(self.b2, h, self.w2)) * self.gain
        return self.head(h)


@pytest.mark.parametrize("layout", ["one row per unit", "several rows per unit"])
def test_hand_written_layers_take_the_fast_path_with_exact_gradients(layout: str) -> None:
    torch.manual_seed(4)
    program = program_of(HandWritten(), 6)
    unit = torch.arange(8) if layout == "one row per unit" else torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    units = int(unit.max()) + 1
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for max_grad_norm in (1e9, 0.2):
        cfg = config(3, max_grad_norm=max_grad_norm, n_units=units, max_rows=3)
        clipper, _, why = dpsgd.choose_clipper(program, 6, cfg)
        assert clipper.name == "bookkeeping", why
        batch = dpsgd.UnitRows(x, y, unit, n_units=units, max_rows_per_unit=3).batch(np.arange(units))
        fast = clipper.clipped_sum(program.parameters, batch)
        general = dpsgd.VmapClipper(program, cfg).clipped_sum(program.parameters, batch)
        torch.testing.assert_close(fast.norms, general.norms, rtol=1e-5, atol=1e-6)
        for name in general.sums:
            torch.testing.assert_close(fast.sums[name], general.sums[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("clipper_name", sorted(CLIPPERS))
def test_a_unit_with_non_finite_gradient_contributes_nothing(clipper_name: str) -> None:
    program = program_of(small_mlp(6, 3), 6)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    x[1, 0] = float("inf")
    cfg = config(3, max_grad_norm=1.0, n_units=4, max_rows=1)
    batch = dpsgd.UnitRows(x, y, torch.arange(4), n_units=4, max_rows_per_unit=1).batch(np.arange(4))
    result = CLIPPERS[clipper_name](program, cfg).clipped_sum(program.parameters, batch)
    assert not bool(torch.isfinite(result.norms[1]))
    without = dpsgd.UnitRows(x[[0, 2, 3]], y[[0, 2, 3]], torch.arange(3), n_units=3, max_rows_per_unit=1)
    expected = CLIPPERS[clipper_name](program, cfg).clipped_sum(program.parameters, without.batch(np.arange(3)))
    for name, value in result.sums.items():
        assert bool(torch.isfinite(value).all()), f"{name} caught the non-finite unit"
        torch.testing.assert_close(value, expected.sums[name], rtol=1e-5, atol=1e-6)


def test_training_learns_a_separable_task_and_accounts_its_epsilon() -> None:
    torch.manual_seed(5)
    n = 2000
    x = torch.randn(n, 6)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    module = small_mlp(6, 2)
    program = program_of(module, 6)
    rate, epochs = 0.05, 3
    steps = int(epochs / rate)
    sigma = dpsgd.calibrate_noise(epsilon=4.0, delta=1e-5, sample_rate=rate, steps=steps)
    cfg = config(2, max_grad_norm=1.0, n_units=n, max_rows=1, steps=steps, sample_rate=rate, learning_rate=1.0,
                 noise_multiplier=sigma)
    clipper, fallback, why = dpsgd.choose_clipper(program, 6, cfg)
    assert clipper.name == "bookkeeping", why
    seen: list[tuple[int, int, float]] = []
    result = dpsgd.train(program, dpsgd.UnitRows(x, y, torch.arange(n), n_units=n, max_rows_per_unit=1), cfg,
                         clipper=clipper, fallback=fallback, progress=lambda *args: seen.append(args), seed=11)
    assert result.fallback_steps == 0
    assert 3.5 < result.epsilon <= 4.0
    assert seen[-1] == (steps, steps, result.epsilon) and len(seen) == steps   # every step: steps < 50
    module.load_state_dict({key: result.parameters[target] for key, target in program.state_dict_keys.items()})
    accuracy = float((module(x).argmax(1) == y).float().mean())
    assert accuracy > 0.9, f"DP-SGD did not learn a separable task (accuracy {accuracy:.2f})"


def test_regression_with_several_rows_per_unit_runs_both_paths_alike() -> None:
    torch.manual_seed(6)
    program = program_of(small_mlp(6, 2), 6)
    unit = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4])
    x, y = torch.randn(10, 6), torch.randn(10, 2)
    cfg = config(2, max_grad_norm=0.5, n_units=5, max_rows=3, task="regression")
    batch = dpsgd.UnitRows(x, y, unit, n_units=5, max_rows_per_unit=3).batch(np.arange(5))
    fast = dpsgd.BookkeepingClipper(program, cfg).clipped_sum(program.parameters, batch)
    general = dpsgd.VmapClipper(program, cfg).clipped_sum(program.parameters, batch)
    torch.testing.assert_close(fast.norms, general.norms, rtol=1e-5, atol=1e-6)
    for name in fast.sums:
        torch.testing.assert_close(fast.sums[name], general.sums[name], rtol=1e-5, atol=1e-6)
