"""The privacy a DP-SGD run spent: Renyi DP of the Poisson-subsampled Gaussian mechanism, as (epsilon, delta).

The worker recomputes a finished training run's epsilon from its record (noise multiplier, sample rate,
steps, delta) with `epsilon(...)`, independently of the trainer that ran inside the container.

- RDP of one step at order alpha is log(A_alpha) / (alpha - 1), where A_alpha is the moment of the privacy
  loss of the sampled Gaussian (Mironov, Talwar and Zhang 2019, "Renyi Differential Privacy of the Sampled
  Gaussian Mechanism"): a finite binomial sum for integer orders (section 3.2) and two converging series
  with erfc terms for fractional orders (section 3.3), all in log space so large orders do not overflow.
- Steps compose additively in RDP.
- RDP becomes (epsilon, delta) by the conversion of Balle et al. 2020 (Proposition 12, also Canonne, Kamath
  and Steinke 2020), minimised over the same grid of orders Opacus' RDP accountant uses, so the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Opacus' RDPAccountant.DEFAULT_ALPHAS: 1.1 .. 10.9 in steps of 0.1, then 12 .. 63.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(x) for x in range(12, 64)])

# A fractional order's series stops once both of its next terms are below exp(-30): they only shrink from there.
_SERIES_STOP_LOG = -30.0
_SERIES_MAX_TERMS = 100_000


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon, at `delta`, of `steps` Poisson-subsampled Gaussian steps (inf when nothing bounds it)."""
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0 or sample_rate == 0:
        return 0.0  # nothing was released
    rdp = [steps * step_rdp(noise_multiplier, sample_rate, order) for order in ORDERS]
    return rdp_to_epsilon(rdp, ORDERS, delta)


def step_rdp(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """The RDP at `order` of one step: Gaussian noise of std `noise_multiplier` on a sensitivity-1 sum."""
    if sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    if sample_rate == 1:
        return order / (2 * noise_multiplier**2)
    if float(order).is_integer():
        log_moment = _log_moment_integer(sample_rate, noise_multiplier, int(order))
    else:
        log_moment = _log_moment_fractional(sample_rate, noise_multiplier, order)
    return log_moment / (order - 1)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> float:
    """The smallest epsilon at `delta` over the orders, from the RDP curve (Balle et al. 2020, Prop. 12)."""
    if len(rdp) != len(orders):
        raise ValueError("rdp and orders must have the same length")
    best = math.inf
    for value, order in zip(rdp, orders, strict=True):
        if order <= 1 or math.isnan(value) or math.isinf(value):
            continue
        candidate = value - (math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)
        best = min(best, candidate)
    return max(best, 0.0)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a finite number >= 0")
    if not (math.isfinite(sample_rate) and 0 <= sample_rate <= 1):
        raise ValueError("sample_rate must be in [0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError("steps must be an integer >= 0")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError("delta must be in (0, 1)")


def _log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b))."""
    low, high = min(a, b), max(a, b)
    if low == -math.inf:
        return high
    return high + math.log1p(math.exp(low - high))


def _log_moment_integer(q: float, sigma: float, order: int) -> float:
    """log A_alpha for an integer order: sum_k C(alpha, k) q^k (1-q)^(alpha-k) exp((k^2 - k) / (2 sigma^2))."""
    total = -math.inf
    log_q, log_1mq = math.log(q), math.log1p(-q)
    for k in range(order + 1):
        log_binomial = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        term = log_binomial + k * log_q + (order - k) * log_1mq + (k * k - k) / (2 * sigma**2)
        total = _log_add(total, term)
    return total


def _log_moment_fractional(q: float, sigma: float, order: float) -> float:
    """log A_alpha for a fractional order: the two series of section 3.3, split at z0.

    The binomial coefficient C(alpha, i) of a fractional alpha changes sign once i exceeds alpha, so each
    series is kept as a signed sum (positive and negative parts in log space).
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    positive = [-math.inf, -math.inf]   # the two series' positive parts
    negative = [-math.inf, -math.inf]   # and their negative parts
    log_binomial, sign = 0.0, 1.0       # C(alpha, 0) = 1
    for i in range(_SERIES_MAX_TERMS):
        j = order - i
        first = (log_binomial + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2)
                 + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        second = (log_binomial + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2)
                  + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        parts = positive if sign > 0 else negative
        parts[0], parts[1] = _log_add(parts[0], first), _log_add(parts[1], second)
        if max(first, second) < _SERIES_STOP_LOG:
            break
        # C(alpha, i + 1) = C(alpha, i) * (alpha - i) / (i + 1); alpha is not an integer, so never 0
        factor = order - i
        sign *= 1.0 if factor > 0 else -1.0
        log_binomial += math.log(abs(factor)) - math.log(i + 1)
    else:
        raise ArithmeticError(f"the RDP series at order {order} did not converge")
    total = -math.inf
    for index in (0, 1):
        total = _log_add(total, _log_sub(positive[index], negative[index]))
    return total


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b; a series whose negative part wins is a numerical failure."""
    if b == -math.inf:
        return a
    if b > a:
        if b - a < 1e-9:
            return -math.inf
        raise ArithmeticError("the RDP series lost its precision (negative moment)")
    if a == b:
        return -math.inf
    return a + math.log(-math.expm1(b - a))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), also where erfc(x) underflows (x > ~26): the asymptotic series there."""
    if x < 25.0:
        return math.log(math.erfc(x))
    inverse_square = 1.0 / (x * x)
    # erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + 105/(16x^8))
    series = 1 - inverse_square / 2 + 3 * inverse_square**2 / 4 - 15 * inverse_square**3 / 8 \
        + 105 * inverse_square**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)
