"""Demo data: synthetic grocery product names with an aisle > department hierarchy, for builds without real data."""

from __future__ import annotations

import logging

import numpy as np

from tiergate.training.data import Catalogue

logger = logging.getLogger(__name__)

DEMO_SOURCE = "demo data: synthetic"

# aisle -> (department, head nouns). Some heads deliberately appear in two aisles
# (frozen vs fresh versions, snacks vs bakery) so the task has real ambiguity.
_AISLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "yogurt": ("dairy eggs", ("yogurt", "greek yogurt", "skyr", "kefir", "yogurt cup", "yogurt drink")),
    "packaged cheese": ("dairy eggs", ("cheddar", "mozzarella", "swiss cheese", "parmesan", "cheese slices", "brie")),
    "milk": ("dairy eggs", ("whole milk", "skim milk", "oat milk", "almond milk", "milk", "chocolate milk")),
    "fresh fruits": ("produce", ("bananas", "apples", "strawberries", "blueberries", "mango", "lemons")),
    "fresh vegetables": ("produce", ("carrots", "spinach", "broccoli", "onions", "kale", "peppers")),
    "chips pretzels": ("snacks", ("potato chips", "tortilla chips", "pretzels", "kettle chips", "pita chips")),
    "cookies cakes": ("snacks", ("cookies", "sandwich cookies", "brownies", "snack cakes", "wafers", "muffins")),
    "bread": ("bakery", ("bread", "sourdough loaf", "bagels", "english muffins", "muffins", "tortillas")),
    "frozen meals": ("frozen", ("frozen lasagna", "burrito", "pizza", "mac and cheese", "pot pie", "enchiladas")),
    "ice cream ice": ("frozen", ("ice cream", "gelato", "sorbet", "frozen yogurt", "ice pops", "ice cream bars")),
    "tea": ("beverages", ("green tea", "black tea", "herbal tea", "chai", "iced tea", "oolong tea")),
    "soft drinks": ("beverages", ("cola", "ginger ale", "lemon soda", "root beer", "sparkling water", "iced tea")),
    "shampoo": ("personal care", ("shampoo", "conditioner", "dry shampoo", "2 in 1 shampoo", "hair mask")),
    "dish detergents": ("household", ("dish soap", "dishwasher pods", "dish liquid", "rinse aid", "dish detergent")),
}
_BRANDS = (
    "Green Valley", "Sunrise", "Happy Farms", "Blue Ridge", "Nature's Best", "Kirkwood", "Maple Lane",
    "Golden Acre", "Urban Pantry", "Silver Spoon", "Harvest Moon", "Little Oak",
)
_MODIFIERS = ("Organic", "Low Fat", "Original", "Classic", "Family Size", "Gluten Free", "Natural", "Light", "")
_FLAVOURS = (
    "Vanilla", "Strawberry", "Honey", "Sea Salt", "Chocolate", "Lemon", "Peach", "Cinnamon", "Mint", "Plain", "",
)
_SIZES = ("12 oz", "16 oz", "32 oz", "1 lb", "6 ct", "24 ct", "2 L", "500 ml", "")


def demo_aisles(n_labels: int | None = None) -> list[str]:
    """The demo aisle names, optionally only the first ``n_labels`` (spread over departments)."""
    names = list(_AISLES)
    if n_labels is None or n_labels >= len(names):
        return names
    if n_labels < 2:
        raise ValueError("the demo catalogue needs at least 2 labels")
    # Interleave so a small subset still spans several departments.
    order = names[0::3] + names[1::3] + names[2::3]
    return order[:n_labels]


def generate_demo_catalogue(n_rows: int = 3000, seed: int = 0, n_labels: int | None = None) -> Catalogue:
    """A deterministic synthetic catalogue of ``n_rows`` unique product names (task: aisle)."""
    rng = np.random.default_rng(seed)
    aisles = sorted(demo_aisles(n_labels))
    texts: list[str] = []
    y: list[int] = []
    seen: set[str] = set()
    attempts = 0
    while len(texts) < n_rows:
        attempts += 1
        if attempts > n_rows * 50:
            raise ValueError(f"cannot generate {n_rows} unique demo names from {len(aisles)} labels")
        label = int(rng.integers(len(aisles)))
        heads = _AISLES[aisles[label]][1]
        parts = [
            _BRANDS[rng.integers(len(_BRANDS))] if rng.random() < 0.8 else "",
            _MODIFIERS[rng.integers(len(_MODIFIERS))],
            _FLAVOURS[rng.integers(len(_FLAVOURS))],
            heads[rng.integers(len(heads))].title(),
            _SIZES[rng.integers(len(_SIZES))],
        ]
        # A little label noise keeps the demo task from being trivially separable.
        if rng.random() < 0.04:
            label = int(rng.integers(len(aisles)))
        name = " ".join(p for p in parts if p)
        if name in seen:
            continue
        seen.add(name)
        texts.append(name)
        y.append(label)
    return Catalogue(
        source=DEMO_SOURCE,
        task="aisle",
        texts=texts,
        y=np.array(y, dtype=np.int64),
        labels=aisles,
        parents={a: _AISLES[a][0] for a in aisles},
        ids=[f"demo-{i}" for i in range(len(texts))],
    )
