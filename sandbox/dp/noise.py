"""OpenDP's vetted samplers with noise scales in closed form: no search, one cheap privacy-map check each.

Every function takes exact integers (counts, fixed-point sums, quantile scores) so the noise is
discrete (discrete Laplace or discrete Gaussian) and no floating-point sum can leak through rounding.
The scale comes from a formula; OpenDP's own privacy map then confirms the loss is within budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from opendp import domains, measurements, measures, metrics
from opendp.accuracy import discrete_gaussian_scale_to_accuracy, discrete_laplacian_scale_to_accuracy
from opendp.mod import enable_features

enable_features("contrib")

CONFIDENCE_ALPHA = 0.05  # accuracies are half-widths of 95% intervals
# A scale a hair wider than the formula's keeps floating-point rounding in OpenDP's map below budget.
_SCALE_MARGIN = 1 + 1e-9


class CalibrationError(RuntimeError):
    """OpenDP's privacy map reported more loss than the closed-form scale promised."""


@dataclass(frozen=True)
class Loss:
    """One statistic's privacy loss: exactly one of epsilon (pure DP) or rho (zCDP), plus delta."""

    epsilon: float | None = None
    rho: float | None = None
    delta: float = 0.0

    @property
    def is_pure(self) -> bool:
        return self.epsilon is not None


@dataclass(frozen=True)
class NoisyVector:
    values: list[int]
    scale: float
    accuracy: float  # 95% half-width, in the same (integer) units as values
    mechanism: str
    loss: Loss


@dataclass(frozen=True)
class NoisyCounts:
    """Counts released through a threshold: only keys whose noisy count cleared it."""

    counts: dict[str, int]
    scale: float
    threshold: int
    accuracy: float
    mechanism: str
    loss: Loss


def laplace_scale(l1: float, epsilon: float) -> float:
    """Discrete Laplace scale for an L1 sensitivity under epsilon-DP: l1 / epsilon."""
    return _positive(l1, epsilon) * _SCALE_MARGIN


def gaussian_sigma(l2: float, rho: float) -> float:
    """Gaussian sigma for an L2 sensitivity under rho-zCDP: l2 / sqrt(2 rho)."""
    return _positive(l2, math.sqrt(2 * rho)) * _SCALE_MARGIN


def noisy_max_scale(linf: float, loss: Loss) -> float:
    """Scale of report-noisy-max over non-monotonic scores: 2 d / epsilon, or d / sqrt(2 rho)."""
    if loss.epsilon is not None:
        return _positive(2 * linf, loss.epsilon) * _SCALE_MARGIN
    assert loss.rho is not None
    return _positive(linf, math.sqrt(2 * loss.rho)) * _SCALE_MARGIN


def laplace_threshold(l0: int, linf: float, scale: float, delta: float) -> int:
    """Threshold so that each of l0 keys one unit alone creates (count <= linf) clears it w.p. <= delta / l0."""
    return math.ceil(linf + scale * math.log(l0 / delta)) + 1


def gaussian_threshold(l0: int, linf: float, sigma: float, delta: float) -> int:
    """Threshold so that each of l0 keys one unit alone creates (count <= linf) clears it w.p. <= delta / l0."""
    return math.ceil(linf + sigma * NormalDist().inv_cdf(1 - delta / l0)) + 1


def add_noise(values: list[int], *, l1: int, l2: float, loss: Loss) -> NoisyVector:
    """Integer vector plus discrete Laplace (pure DP) or discrete Gaussian (zCDP) noise, one draw per cell."""
    domain = domains.vector_domain(domains.atom_domain(T="i64"))
    if loss.epsilon is not None:
        scale = laplace_scale(l1, loss.epsilon)
        measurement = measurements.make_laplace(domain, metrics.l1_distance(T="i64"), scale)
        _check(_privacy_loss(measurement, int(l1)), loss.epsilon, "discrete Laplace")
        accuracy = float(discrete_laplacian_scale_to_accuracy(scale, CONFIDENCE_ALPHA))
        mechanism = "discrete_laplace"
    else:
        assert loss.rho is not None
        scale = gaussian_sigma(l2, loss.rho)
        measurement = measurements.make_gaussian(domain, metrics.l2_distance(T=float), scale)
        _check(_privacy_loss(measurement, float(l2)), loss.rho, "discrete Gaussian")
        accuracy = float(discrete_gaussian_scale_to_accuracy(scale, CONFIDENCE_ALPHA))
        mechanism = "discrete_gaussian"
    noisy = [int(v) for v in measurement([int(v) for v in values])] if values else []
    return NoisyVector(values=noisy, scale=scale, accuracy=accuracy, mechanism=mechanism, loss=loss)


def threshold_counts(counts: dict[str, int], *, l0: int, l1: int, l2: float, linf: int, loss: Loss) -> NoisyCounts:
    """Noisy counts of keys that need not exist; keys below a delta-calibrated threshold are dropped."""
    if loss.delta <= 0:
        raise CalibrationError("releasing group keys that are not public needs delta > 0")
    domain = domains.map_domain(domains.atom_domain(T=str), domains.atom_domain(T="i64"))
    if loss.epsilon is not None:
        scale = laplace_scale(l1, loss.epsilon)
        threshold = laplace_threshold(l0, linf, scale, loss.delta)
        measurement = _laplace_threshold(domain, scale, threshold)
        spent_epsilon, spent_delta = _privacy_loss(measurement, (l0, int(l1), int(linf)))
        _check(spent_epsilon, loss.epsilon, "discrete Laplace threshold")
        accuracy = float(discrete_laplacian_scale_to_accuracy(scale, CONFIDENCE_ALPHA))
        mechanism = "discrete_laplace"
    else:
        assert loss.rho is not None
        # The threshold metric measures distances in the counts' own type (i64): the L2 bound is
        # rounded up to an integer, for the scale and the map alike (review 11.8: a float made it a 500).
        l2_bound = math.ceil(l2)
        scale = gaussian_sigma(l2_bound, loss.rho)
        threshold = gaussian_threshold(l0, linf, scale, loss.delta)
        measurement = _gaussian_threshold(domain, scale, threshold)
        spent_rho, spent_delta = _privacy_loss(measurement, (l0, l2_bound, int(linf)))
        _check(spent_rho, loss.rho, "discrete Gaussian threshold")
        accuracy = float(discrete_gaussian_scale_to_accuracy(scale, CONFIDENCE_ALPHA))
        mechanism = "discrete_gaussian"
    _check(spent_delta, loss.delta, "threshold delta")
    released = {str(k): int(v) for k, v in measurement({k: int(v) for k, v in counts.items()}).items()}
    return NoisyCounts(counts=released, scale=scale, threshold=threshold, accuracy=accuracy,
                       mechanism=mechanism, loss=loss)


def select_lowest(scores: list[int], *, d_in: int, loss: Loss) -> int:
    """Index of the (noisily) lowest score: report-noisy-max over negated, non-monotonic scores."""
    domain = domains.vector_domain(domains.atom_domain(T="i64"))
    measure = measures.max_divergence() if loss.is_pure else measures.zero_concentrated_divergence()
    scale = noisy_max_scale(d_in, loss)
    measurement = measurements.make_noisy_max(domain, metrics.linf_distance(T="i64"), measure, scale, negate=True)
    allowed = loss.epsilon if loss.epsilon is not None else loss.rho
    assert allowed is not None
    _check(_privacy_loss(measurement, int(d_in)), allowed, "noisy max")
    return int(measurement([int(s) for s in scores]))


def _laplace_threshold(domain: Any, scale: float, threshold: int) -> Any:
    return measurements.make_laplace_threshold(domain, metrics.l01inf_distance(metrics.absolute_distance(T="i64")),
                                               scale=scale, threshold=threshold)


def _gaussian_threshold(domain: Any, scale: float, threshold: int) -> Any:
    return measurements.make_gaussian_threshold(domain, metrics.l02inf_distance(metrics.absolute_distance(T="i64")),
                                                scale=scale, threshold=threshold)


def _privacy_loss(measurement: Any, d_in: Any) -> Any:
    """OpenDP's own privacy map: the loss the measurement guarantees at input distance d_in."""
    return measurement.map(d_in)


def _positive(numerator: float, denominator: float) -> float:
    if not (numerator > 0 and denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator)):
        raise CalibrationError("sensitivity and budget must be positive and finite")
    return numerator / denominator


def _check(reported: float, allowed: float, what: str) -> None:
    if not float(reported) <= allowed:
        raise CalibrationError(f"{what}: OpenDP's map reports {float(reported)!r}, above the budget {allowed!r}")
