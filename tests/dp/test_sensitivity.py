"""Sensitivity rules: contribution bounds to L0/L1/L2/Linf norms, and closed-form noise scales."""

from __future__ import annotations

import math

import pytest

from sandbox.dp import noise, sensitivity
from sandbox.dp.sensitivity import Contribution


def test_row_level_count_moves_one_cell_by_one() -> None:
    norms = sensitivity.count_rows(sensitivity.row_level())
    assert (norms.l0, norms.l1, norms.l2, norms.linf) == (1, 1, 1, 1)


def test_per_group_bounds_give_the_textbook_norms() -> None:
    bound = sensitivity.per_group_bounds(rows_per_unit=3, groups_per_unit=4)
    count = sensitivity.count_rows(bound)
    assert (count.l0, count.l1, count.linf) == (4, 12, 3)
    assert count.l2 == pytest.approx(3 * math.sqrt(4))
    total = sensitivity.sum_of_bounded(bound, sensitivity.sum_magnitude(-5, 2))
    assert (total.l1, total.linf) == (60, 15), "sum: max(|lo|, |hi|) * rows_per_unit * groups_per_unit"


def test_a_total_row_bound_allows_all_rows_in_one_cell() -> None:
    bound = sensitivity.total_row_bound(rows_total=6, cells=5)
    norms = sensitivity.count_rows(bound)
    assert (norms.l0, norms.l1, norms.l2, norms.linf) == (5, 6, 6, 6)
    assert sensitivity.total_row_bound(rows_total=2, cells=1).groups == 1


def test_magnitudes_of_clamped_values() -> None:
    assert sensitivity.sum_magnitude(18, 90) == 90
    assert sensitivity.sum_magnitude(-100, 3) == 100
    assert sensitivity.centred_magnitude(18, 90) == 36
    with pytest.raises(ValueError):
        sensitivity.sum_magnitude(2, 1)


def test_quantile_scores_move_by_the_larger_alpha_side() -> None:
    norms = sensitivity.quantile_score(sensitivity.per_group_bounds(2, 1), 1, 4)
    assert norms.linf == 2 * 3


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Contribution(groups=0, rows_per_group=1, rows_total=1)


def test_closed_form_scales() -> None:
    assert noise.laplace_scale(4, 2.0) == pytest.approx(2.0)
    assert noise.gaussian_sigma(2, 0.5) == pytest.approx(2.0)
    assert noise.noisy_max_scale(3, noise.Loss(epsilon=1.0)) == pytest.approx(6.0)
    assert noise.laplace_threshold(1, 1, 1.0, math.exp(-10)) >= 11


def test_opendp_confirms_each_closed_form_scale_is_within_budget() -> None:
    released = noise.add_noise([10, 20], l1=7, l2=5.0, loss=noise.Loss(epsilon=0.3))
    assert released.scale == pytest.approx(7 / 0.3)
    assert released.mechanism == "discrete_laplace"
    released = noise.add_noise([10, 20], l1=7, l2=5.0, loss=noise.Loss(rho=0.3))
    assert released.scale == pytest.approx(5 / math.sqrt(0.6))
    assert released.mechanism == "discrete_gaussian"
