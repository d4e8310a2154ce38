"""The host's RDP accountant (`sandbox.budgets.rdp`) against Opacus' RDPAccountant, which the trainer uses."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
from opacus.accountants import RDPAccountant

from sandbox.budgets import rdp

DELTA = 1e-5
GRID = list(itertools.product((0.001, 0.01, 0.1), (0.6, 1.0, 2.0), (10, 1000, 10000)))


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("sample_rate", "noise_multiplier", "steps"), GRID)
def test_epsilon_matches_opacus_within_one_percent(sample_rate: float, noise_multiplier: float, steps: int) -> None:
    expected = opacus_epsilon(noise_multiplier, sample_rate, steps, DELTA)
    got = rdp.epsilon(noise_multiplier, sample_rate, steps, DELTA)
    assert got == pytest.approx(expected, rel=0.01), f"q={sample_rate} sigma={noise_multiplier} steps={steps}"


def test_fractional_and_integer_orders_agree_with_opacus_at_every_order() -> None:
    """The per-order RDP, not only the final epsilon (which one order decides)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    for sample_rate, noise_multiplier in ((0.01, 0.8), (0.3, 1.5)):
        expected = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(rdp.ORDERS))
        for order, value in zip(rdp.ORDERS, expected, strict=True):
            assert rdp.step_rdp(noise_multiplier, sample_rate, order) == pytest.approx(float(value), rel=1e-6), order


def test_more_noise_fewer_steps_or_rarer_sampling_spend_less() -> None:
    base = rdp.epsilon(1.0, 0.01, 1000, DELTA)
    assert rdp.epsilon(2.0, 0.01, 1000, DELTA) < base
    assert rdp.epsilon(1.0, 0.01, 100, DELTA) < base
    assert rdp.epsilon(1.0, 0.001, 1000, DELTA) < base


def test_edge_cases() -> None:
    assert rdp.epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert rdp.epsilon(1.0, 0.0, 100, DELTA) == 0.0
    assert math.isinf(rdp.epsilon(0.0, 0.01, 100, DELTA))
    # Full-batch Gaussian: RDP alpha / (2 sigma^2) per step.
    assert rdp.epsilon(5.0, 1.0, 10, DELTA) == pytest.approx(opacus_epsilon(5.0, 1.0, 10, DELTA), rel=1e-9)
    for bad in ((-1.0, 0.1, 10, DELTA), (1.0, 1.5, 10, DELTA), (1.0, 0.1, -1, DELTA), (1.0, 0.1, 10, 0.0)):
        with pytest.raises(ValueError):
            rdp.epsilon(*bad)
