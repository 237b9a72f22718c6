"""Cost accounting: what a request's tier work costs, against sending every row to the last tier."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """The price of one request's tier work, and of the same rows sent straight to the last tier."""

    spent: float
    cloud_only: float

    @property
    def saved(self) -> float:
        """Negative when escalations cost more than the edge saved (an escalated row is paid twice)."""
        return self.cloud_only - self.spent


class CostModel:
    """Prices per 1,000 rows by tier name; the reference is the last tier of the chain."""

    def __init__(self, per_1k_rows: Mapping[str, float], reference_tier: str, currency: str) -> None:
        if reference_tier not in per_1k_rows:
            raise ValueError(f"no price for the reference tier {reference_tier!r}")
        if any(price < 0 for price in per_1k_rows.values()):
            raise ValueError("tier prices must not be negative")
        self._per_row = {tier: price / 1000.0 for tier, price in per_1k_rows.items()}
        self.reference_tier = reference_tier
        self.currency = currency

    def price(self, processed: Mapping[str, int], rows: int) -> Cost:
        """`processed`: rows each tier ran (escalated rows count at every tier they passed)."""
        spent = sum(self._per_row.get(tier, 0.0) * count for tier, count in processed.items())
        return Cost(spent=spent, cloud_only=self._per_row[self.reference_tier] * rows)
