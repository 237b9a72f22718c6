"""Cost accounting: what a request's tier work costs, against sending every row to the last tier."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """The price of one request's tier work, and of the same rows sent straight to the last tier.

    Per row, tiering either saves (the edge answered: the cloud's price less the edge's) or overspends
    (the edge ran, then the row escalated anyway: the edge's price). Both only grow, so both can be
    counters; what tiering saved in all is their difference, `cloud_only - spent`.
    """

    spent: float
    cloud_only: float
    saved: float = 0.0
    overspent: float = 0.0

    @property
    def net_saved(self) -> float:
        return self.saved - self.overspent


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

    def price(self, ran: Sequence[Sequence[str]]) -> Cost:
        """`ran`: per row, the tiers that ran it (an escalated row is paid at each)."""
        reference = self._per_row[self.reference_tier]
        spent = saved = overspent = 0.0
        for tiers in ran:
            row = sum(self._per_row.get(tier, 0.0) for tier in tiers)
            spent += row
            if row <= reference:
                saved += reference - row
            else:
                overspent += row - reference
        return Cost(spent=spent, cloud_only=reference * len(ran), saved=saved, overspent=overspent)
