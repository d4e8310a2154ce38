"""Price lists, billing periods and invoice lines: pure, exact (Decimal), no I/O.

Money is exact: prices are decimals with at most 6 places, each line's amount is its printed quantity
times its unit price rounded half-up to cents, and a total is the sum of its lines' amounts. On the wire
(JSON and CSV) every quantity, price, amount and total is a decimal *string* ("12.50"), never a float.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from sandbox.errors import Invalid

CENT = Decimal("0.01")
QUANTITY_STEP = Decimal("0.000001")  # quantities print with 6 decimals (a micro-epsilon, 3.6 ms, a kilobyte)
MAX_PRICE = Decimal("1000000000")
SECONDS_PER_HOUR = Decimal(3600)
BYTES_PER_GB = Decimal(1_000_000_000)  # decimal gigabytes, as storage is sold

Price = Annotated[Decimal, Field(ge=0, le=MAX_PRICE, decimal_places=6, allow_inf_nan=False)]


class Item(StrEnum):
    """The lines of an invoice, in the order they print."""

    FLAT_FEE = "flat_fee"
    CPU_HOURS = "cpu_hours"
    GPU_HOURS = "gpu_hours"
    EPSILON = "epsilon"
    RELEASED_GB = "released_gb"


UNITS = {Item.FLAT_FEE: "period", Item.CPU_HOURS: "hour", Item.GPU_HOURS: "hour", Item.EPSILON: "epsilon",
         Item.RELEASED_GB: "GB"}


class PriceList(BaseModel):
    """A contract's prices, each per unit and optional (unpriced means free): the `prices` of a contract.

    Prices are non-negative decimals (JSON numbers or decimal strings) with at most 6 places.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    flat_per_period: Price | None = Field(default=None, description="per month the contract is valid in")
    cpu_hour: Price | None = None
    gpu_hour: Price | None = None
    epsilon: Price | None = Field(default=None, description="per unit of epsilon charged to the contract")
    released_gb: Price | None = Field(default=None, description="per 10^9 bytes released")

    def unit_price(self, item: Item) -> Decimal:
        price = {Item.FLAT_FEE: self.flat_per_period, Item.CPU_HOURS: self.cpu_hour, Item.GPU_HOURS: self.gpu_hour,
                 Item.EPSILON: self.epsilon, Item.RELEASED_GB: self.released_gb}[item]
        return price if price is not None else Decimal(0)

    def stored(self) -> dict[str, str]:
        """The JSON the contract keeps (and shows): decimal strings, unpriced items left out."""
        return {key: value if isinstance(value, str) else format(value, "f")
                for key, value in self.model_dump(exclude_none=True).items()}

    @classmethod
    def from_stored(cls, stored: dict[str, Any] | None) -> PriceList:
        """The price list a contract keeps; a contract from before price lists (`{}`) prices nothing."""
        return cls.model_validate(stored or {})


@dataclass(frozen=True)
class Period:
    """One calendar month in UTC: [start, end)."""

    year: int
    month: int

    @property
    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return datetime(self.year + self.month // 12, self.month % 12 + 1, 1, tzinfo=UTC)


def parse_period(text: str | None, *, now: datetime) -> Period:
    """`YYYY-MM` as a month; None is the month of `now` (UTC). Anything else is Invalid (a 422)."""
    if text is None:
        now = now.astimezone(UTC)
        return Period(now.year, now.month)
    found = re.fullmatch(r"([0-9]{4})-(0[1-9]|1[0-2])", text)
    if found is None or int(found.group(1)) < 1970:
        raise Invalid("the period must be a month written YYYY-MM (UTC), such as 2027-01",
                      [f"period {text[:40]!r} is not YYYY-MM"])
    return Period(int(found.group(1)), int(found.group(2)))


@dataclass(frozen=True)
class Line:
    item: Item
    quantity: Decimal  # as printed: QUANTITY_STEP places
    unit_price: Decimal
    amount: Decimal  # cents
    events: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"item": self.item.value, "quantity": str(self.quantity), "unit": UNITS[self.item],
                "unit_price": format(self.unit_price, "f"), "amount": str(self.amount), "events": list(self.events)}


def priced_line(item: Item, quantity: Decimal, prices: PriceList, events: tuple[int, ...] = ()) -> Line:
    """A line: the quantity rounded half-up to 6 places, times the unit price, rounded half-up to cents."""
    shown = quantity.quantize(QUANTITY_STEP, rounding=ROUND_HALF_UP)
    unit_price = prices.unit_price(item)
    amount = (shown * unit_price).quantize(CENT, rounding=ROUND_HALF_UP)
    return Line(item=item, quantity=shown, unit_price=unit_price, amount=amount, events=events)


def total(lines: list[Line]) -> Decimal:
    return sum((line.amount for line in lines), Decimal(0)).quantize(CENT)


def billed_hours(seconds: Decimal) -> Decimal:
    """Compute is billed per started second: a period's seconds rounded up, then in hours.

    Whole seconds also keep a job's exact timing (which its code chooses, and which can carry what it
    read) off the buyer's invoice, as the usage report does for buyers.
    """
    return Decimal(max(math.ceil(seconds), 0)) / SECONDS_PER_HOUR


def gigabytes(size_bytes: Decimal) -> Decimal:
    return size_bytes / BYTES_PER_GB
