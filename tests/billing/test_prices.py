"""Price lists, periods and line maths: exact decimals, half-up to cents, bad input refused."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from sandbox.billing.prices import (
    Item,
    PriceList,
    billed_hours,
    gigabytes,
    parse_period,
    priced_line,
    total,
)
from sandbox.contracts import ContractRequest
from sandbox.errors import Invalid

PRICES = PriceList(currency="EUR", flat_per_period=Decimal("500"), cpu_hour=Decimal("0.40"),
                   gpu_hour=Decimal("2.5"), epsilon=Decimal("100"), released_gb=Decimal("10"))


def test_a_line_is_its_printed_quantity_times_its_price_rounded_half_up_to_cents() -> None:
    line = priced_line(Item.CPU_HOURS, Decimal("0.0125"), PRICES)  # 0.0125 h x 0.40 = 0.005 -> 0.01
    assert (line.quantity, line.amount) == (Decimal("0.012500"), Decimal("0.01"))
    line = priced_line(Item.CPU_HOURS, Decimal("0.0124"), PRICES)  # 0.00496 -> 0.00
    assert line.amount == Decimal("0.00")
    line = priced_line(Item.EPSILON, Decimal("0.000005"), PRICES)  # 0.0005 -> 0.00; a half cent rounds up:
    assert line.amount == Decimal("0.00")
    assert priced_line(Item.EPSILON, Decimal("0.00005"), PRICES).amount == Decimal("0.01")
    # Binary floats would make 0.1 + 0.2 slightly more than 0.3; decimals do not.
    assert priced_line(Item.RELEASED_GB, Decimal("0.1") + Decimal("0.2"), PRICES).amount == Decimal("3.00")


def test_quantities_print_with_six_places_and_the_amount_follows_the_printed_figure() -> None:
    hours = billed_hours(Decimal("1"))  # one second: 0.000277... h
    line = priced_line(Item.GPU_HOURS, hours, PRICES)
    assert line.quantity == Decimal("0.000278")
    assert line.amount == (Decimal("0.000278") * Decimal("2.5")).quantize(Decimal("0.01"))
    assert line.as_dict() == {"item": "gpu_hours", "quantity": "0.000278", "unit": "hour", "unit_price": "2.5",
                              "amount": "0.00", "events": []}


def test_compute_is_billed_per_started_second() -> None:
    assert billed_hours(Decimal("3600")) == Decimal(1)
    assert billed_hours(Decimal("3600.001")) == Decimal(3601) / Decimal(3600)
    assert billed_hours(Decimal("0")) == 0
    assert gigabytes(Decimal(1_500_000_000)) == Decimal("1.5")


def test_unpriced_items_cost_nothing_and_the_total_is_the_sum_of_the_lines() -> None:
    free = PriceList()
    lines = [priced_line(Item.CPU_HOURS, Decimal(7), free), priced_line(Item.FLAT_FEE, Decimal(1), PRICES),
             priced_line(Item.EPSILON, Decimal("0.333333"), PRICES)]
    assert [line.amount for line in lines] == [Decimal("0.00"), Decimal("500.00"), Decimal("33.33")]
    assert total(lines) == Decimal("533.33")
    assert free.currency == "EUR" and free.stored() == {"currency": "EUR"}


def test_a_price_list_is_kept_as_decimal_strings() -> None:
    stored = PriceList.model_validate({"currency": "CHF", "cpu_hour": 0.4, "epsilon": "1e2"}).stored()
    assert stored == {"currency": "CHF", "cpu_hour": "0.4", "epsilon": "100"}
    assert PriceList.from_stored(stored).epsilon == Decimal(100)
    assert PriceList.from_stored({}) == PriceList()


@pytest.mark.parametrize("prices", [
    {"cpu_hour": -1}, {"cpu_hour": float("nan")}, {"cpu_hour": "NaN"}, {"cpu_hour": "Infinity"},
    {"gpu_hour": True}, {"epsilon": "ten"}, {"per_query": 1}, {"currency": "euro"},
    {"released_gb": 0.0000001}, {"flat_per_period": 10**10}, {"cpu_hour": [1]},
])
def test_a_bad_price_list_is_refused(prices: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PriceList.model_validate(prices)
    with pytest.raises(ValidationError):
        ContractRequest.model_validate({"buyer_org": "acme", "datasets": ["d"], "tier": "aggregate",
                                        "kinds": ["query"], "purpose": "p", "valid_until": "2099-01-01",
                                        "epsilon": 1, "prices": prices})


def test_a_period_is_a_utc_month() -> None:
    period = parse_period("2027-12", now=datetime.now(UTC))
    assert period.label == "2027-12"
    assert (period.start, period.end) == (datetime(2027, 12, 1, tzinfo=UTC), datetime(2028, 1, 1, tzinfo=UTC))
    assert parse_period(None, now=datetime(2027, 3, 31, 23, 59, tzinfo=UTC)).label == "2027-03"


@pytest.mark.parametrize("text", ["2027-13", "2027-00", "2027-1", "27-01", "2027-01-01", "2027/01", " 2027-01",
                                  "2027-01\n", "", "1969-12", "\uff12\uff10\uff12\uff17-01", "2027-01'--"])
def test_anything_but_yyyy_mm_is_invalid(text: str) -> None:
    with pytest.raises(Invalid, match="YYYY-MM"):
        parse_period(text, now=datetime.now(UTC))
