"""The one privacy-cost type: exact units, computed once from the plan and the request, shown as requested."""

from __future__ import annotations

import math

import pytest

from sandbox.budgets.cost import EPSILON_STEP_UNITS, PrivacyCost, epsilon_units_up, zcdp_to_approx_dp
from sandbox.errors import Invalid


@pytest.mark.parametrize("epsilon", [0.01, 0.013, 0.1, 0.3, 1.0, 2.5, 30.0, 100.0])
def test_a_requested_epsilon_is_held_exactly_and_shown_as_requested(epsilon: float) -> None:
    cost = PrivacyCost.requested(epsilon=epsilon)
    assert cost.epsilon_units % EPSILON_STEP_UNITS == 0
    assert cost.epsilon == epsilon, f"epsilon {epsilon!r} shows as {cost.epsilon!r}"
    assert cost.is_pure and cost.rho is None and cost.delta_units == 0


@pytest.mark.parametrize("delta", [0.0, 1e-12, 3e-12, 1e-9, 1e-6, 0.02])
def test_a_requested_delta_is_held_exactly_and_shown_as_requested(delta: float) -> None:
    assert PrivacyCost.requested(epsilon=1.0, delta=delta).delta == delta


def test_zcdp_is_charged_as_its_conversion_rounded_up_to_the_grid() -> None:
    cost = PrivacyCost.requested(rho=0.5, delta=1e-6)
    exact = zcdp_to_approx_dp(0.5, 1e-6)
    assert cost.rho == 0.5 and not cost.is_pure
    assert cost.epsilon_units == epsilon_units_up(exact) and exact <= cost.epsilon < exact + 0.001


def test_private_keys_pay_their_threshold_from_delta() -> None:
    public = PrivacyCost.requested(rho=0.5, delta=1e-6)
    private = PrivacyCost.requested(rho=0.5, delta=1e-6, private_keys=True)
    assert (public.threshold_delta, public.conversion_delta) == (0.0, 1e-6)
    assert (private.threshold_delta, private.conversion_delta) == (5e-7, 5e-7)
    assert private.epsilon_units == epsilon_units_up(zcdp_to_approx_dp(0.5, 5e-7)) > public.epsilon_units
    pure = PrivacyCost.requested(epsilon=1.0, delta=1e-6, private_keys=True)
    assert (pure.threshold_delta, pure.epsilon) == (1e-6, 1.0), "pure DP gives the threshold all of delta"


def test_covers_accepts_the_cost_itself_and_nothing_above_it() -> None:
    cost = PrivacyCost.requested(epsilon=0.5, delta=1e-6)
    assert cost.covers(epsilon=0.5, delta=1e-6)
    assert cost.covers(epsilon=0.25, delta=0.0)
    assert not cost.covers(epsilon=0.5000001, delta=1e-6), "a spend above the cost, rounded onto the grid"
    assert not cost.covers(epsilon=0.5, delta=2e-6)
    assert not cost.covers(epsilon=math.inf, delta=0.0)
    assert not cost.covers(epsilon=math.nan, delta=0.0)


@pytest.mark.parametrize(("budget", "message"), [
    ({"epsilon": 0.0015}, "steps of 0.001"),
    ({"epsilon": 0.005}, "at least 0.01"),
    ({"rho": 1e-7, "delta": 1e-6}, "rho is requested in steps"),
    ({"epsilon": 1.0, "delta": 1.5e-13}, "steps of 1e-12"),
    ({"epsilon": 1.0, "rho": 1.0}, "exactly one"),
    ({}, "exactly one"),
    ({"rho": 1.0}, "delta > 0"),
    ({"epsilon": 1.0, "delta": 1.0}, r"\[0, 1\)"),
    ({"epsilon": math.inf}, "finite"),
])
def test_a_cost_off_the_grid_or_of_no_kind_is_refused(budget: dict[str, float], message: str) -> None:
    with pytest.raises(Invalid, match=message):
        PrivacyCost.requested(**budget)
