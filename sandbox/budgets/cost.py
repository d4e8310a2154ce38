"""What a DP query costs, in exact units: the one type that is reserved, handed to the engine and reported.

Arithmetic is exact: epsilon (and rho) in integer micro-units, delta in integer units of 1e-12. A float
sum with a slack let 50 queries at epsilon 1e-9 through an exhausted budget, and a pure-DP contract pay a
delta of 1e-9 (review 11.4). Buyers request epsilon on a grid (EPSILON_STEP, at least EPSILON_MIN) and
see budgets rounded to it, so the spend they can observe carries no extra bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

from sandbox.errors import Invalid

EPSILON_SCALE = 1_000_000            # units per epsilon (and per rho): micro-epsilon
DELTA_SCALE = 1_000_000_000_000      # units per delta: 1e-12
EPSILON_STEP_UNITS = 1_000           # requests and displays in steps of epsilon 0.001
EPSILON_MIN_UNITS = 10_000           # and at least epsilon 0.01
EPSILON_STEP = EPSILON_STEP_UNITS / EPSILON_SCALE
EPSILON_MIN = EPSILON_MIN_UNITS / EPSILON_SCALE


@dataclass(frozen=True)
class PrivacyCost:
    """One query's privacy cost: the (epsilon, delta) the ledger holds, and how the engine's noise spends it.

    Built once, from the plan and the request (`QueryPlan.cost`); the same value is reserved, handed to
    the engine, checked against the engine's own account of its spend, and shown in the answer.
    """

    epsilon_units: int              # the epsilon charged: the noise's own (pure DP), or rho converted (zCDP)
    delta_units: int = 0            # the delta charged, as requested
    rho_units: int | None = None    # zCDP noise: the rho its statistics share; None for pure epsilon-DP noise
    private_keys: bool = False      # group keys without public categories: part of delta pays their threshold

    @classmethod
    def requested(cls, *, epsilon: float | None = None, rho: float | None = None, delta: float = 0.0,
                  private_keys: bool = False) -> PrivacyCost:
        """The cost of exactly one of epsilon (pure DP) or rho (zCDP), plus delta; Invalid if off the grid.

        A zCDP cost is charged as the (epsilon, delta) it implies, rounded up to the grid: never under-charged.
        """
        if (epsilon is None) == (rho is None):
            raise Invalid("give exactly one of epsilon (pure DP) or rho (zCDP)")
        if not (math.isfinite(delta) and 0 <= delta < 1):
            raise Invalid("delta must be in [0, 1)")
        delta_units = requested_delta_units(delta)
        if epsilon is not None:
            return cls(epsilon_units=requested_epsilon_units(epsilon), delta_units=delta_units,
                       private_keys=private_keys)
        assert rho is not None
        if delta <= 0:
            raise Invalid("a zCDP query (rho) needs a delta > 0 to be charged as (epsilon, delta)")
        noise = cls(epsilon_units=0, delta_units=delta_units, rho_units=requested_epsilon_units(rho, "rho"),
                    private_keys=private_keys)
        assert noise.rho is not None
        converted = epsilon_units_up(zcdp_to_approx_dp(noise.rho, noise.conversion_delta))
        return cls(epsilon_units=converted, delta_units=delta_units, rho_units=noise.rho_units,
                   private_keys=private_keys)

    @property
    def epsilon(self) -> float:
        """The epsilon charged, as a number (on the grid when requested through `requested`)."""
        return self.epsilon_units / EPSILON_SCALE

    @property
    def delta(self) -> float:
        return self.delta_units / DELTA_SCALE

    @property
    def rho(self) -> float | None:
        return self.rho_units / EPSILON_SCALE if self.rho_units is not None else None

    @property
    def is_pure(self) -> bool:
        """Whether the noise is pure epsilon-DP (discrete Laplace), not zCDP (discrete Gaussian)."""
        return self.rho_units is None

    @property
    def threshold_delta(self) -> float:
        """The part of delta that pays for releasing group keys that are not public; 0 when every key is public.

        Pure DP gives the threshold all of delta; zCDP gives it half and converts rho with the other half.
        """
        if not self.private_keys:
            return 0.0
        return self.delta if self.is_pure else self.delta / 2

    @property
    def conversion_delta(self) -> float:
        """The part of delta that turns rho into epsilon (zCDP only)."""
        return self.delta - self.threshold_delta

    def covers(self, *, epsilon: float, delta: float) -> bool:
        """Whether a spend the engine reports, (epsilon, delta), stays within this cost (epsilon on the grid)."""
        if not (math.isfinite(epsilon) and epsilon >= 0):
            return False
        return epsilon_units_up(epsilon) <= self.epsilon_units and delta <= self.delta


def zcdp_to_approx_dp(rho: float, delta: float) -> float:
    """The epsilon of (epsilon, delta)-DP implied by rho-zCDP (Bun & Steinke 2016, Prop. 1.3)."""
    if rho < 0 or not 0 < delta < 1:
        raise ValueError("rho must be non-negative and delta in (0, 1)")
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def _decimal(value: float, what: str) -> Decimal:
    try:
        exact = Decimal(repr(float(value)))  # the shortest text of the float: what the client wrote
    except (InvalidOperation, ValueError) as exc:
        raise Invalid(f"{what} must be a finite number") from exc
    if not exact.is_finite() or exact < 0:
        raise Invalid(f"{what} must be a finite, non-negative number")
    return exact


def requested_epsilon_units(value: float, what: str = "epsilon") -> int:
    """A requested epsilon (or rho) in units; refused unless on the grid and at least the minimum."""
    steps = _decimal(value, what) * EPSILON_SCALE / EPSILON_STEP_UNITS
    if steps != steps.to_integral_value() or steps * EPSILON_STEP_UNITS < EPSILON_MIN_UNITS:
        raise Invalid(f"{what} is requested in steps of {EPSILON_STEP:g} and at least {EPSILON_MIN:g}; "
                      f"{value!r} is not one of them",
                      errors=[f"{what} must be a multiple of {EPSILON_STEP:g}, at least {EPSILON_MIN:g}"])
    return int(steps) * EPSILON_STEP_UNITS


def epsilon_units_up(value: float) -> int:
    """A computed epsilon (a zCDP conversion) rounded up to the grid: charged, never under-charged."""
    steps = (_decimal(value, "epsilon") * EPSILON_SCALE / EPSILON_STEP_UNITS).to_integral_value(ROUND_CEILING)
    return int(steps) * EPSILON_STEP_UNITS


def requested_delta_units(value: float) -> int:
    """A requested delta in units; refused unless a whole number of 1e-12."""
    units = _decimal(value, "delta") * DELTA_SCALE
    if units != units.to_integral_value():
        raise Invalid(f"delta is requested in steps of {1 / DELTA_SCALE:g}; {value!r} is not one of them",
                      errors=[f"delta must be a multiple of {1 / DELTA_SCALE:g}"])
    return int(units)


def total_units(value: float | None, scale: int) -> int | None:
    """A total (a contract's epsilon, a cap) in units, rounded down: rounding never grants budget."""
    if value is None:
        return None
    return int((_decimal(value, "budget") * scale).to_integral_value(ROUND_FLOOR))


def shown_epsilon(units: int) -> float:
    """An epsilon figure as buyers see it: rounded down to the request grid."""
    return (max(units, 0) // EPSILON_STEP_UNITS) * EPSILON_STEP_UNITS / EPSILON_SCALE


def shown_delta(units: int) -> float:
    return max(units, 0) / DELTA_SCALE
