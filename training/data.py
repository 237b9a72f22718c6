"""The training data: catalogues (Instacart, BigBasket, the generated demo), the grouped split, and re-deriving
a built set's split."""

from __future__ import annotations

import csv
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiergate.manifest import Manifest, ManifestError, load_manifest

TASKS = ("aisle", "department")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
INSTACART_SOURCE = "instacart-products"
BIGBASKET_SOURCE = "bigbasket-products"

# BigBasket sub_category -> Instacart department, from bigbasket-products/SOURCE.md.
BIGBASKET_TO_DEPARTMENT: dict[str, tuple[str, ...]] = {
    "babies": (
        "Baby Bath & Hygiene",
        "Diapers & Wipes",
        "Baby Food & Formula",
        "Feeding & Nursing",
        "Baby Accessories",
    ),
    "bakery": ("Breads & Buns", "Cakes & Pastries", "Gourmet Breads"),
    "dairy eggs": ("Dairy", "Eggs", "Dairy & Cheese"),
    "frozen": ("Ice Creams & Desserts", "Frozen Veggies & Snacks"),
    "personal care": (
        "Bath & Hand Wash",
        "Feminine Hygiene",
        "Fragrances & Deos",
        "Hair Care",
        "Health & Medicine",
        "Makeup",
        "Men's Grooming",
        "Oral Care",
        "Skin Care",
    ),
    "beverages": ("Coffee", "Energy & Soft Drinks", "Fruit Juices & Drinks", "Tea", "Water", "Drinks & Beverages"),
    "household": (
        "All Purpose Cleaners",
        "Detergents & Dishwash",
        "Disposables/Garbage Bag",
        "Fresheners & Repellents",
        "Mops/Brushes & Scrubs",
    ),
    "meat seafood": ("Fish & Seafood", "Mutton & Lamb", "Pork & Other Meats", "Sausages/Bacon & Salami"),
    "produce": (
        "Fresh Fruits",
        "Fresh Vegetables",
        "Exotic Fruits & Veggies",
        "Organic Fruits & Vegetables",
        "Herbs & Seasonings",
        "Cuts & Sprouts",
    ),
    "pantry": (
        "Masalas & Spices",
        "Salt/Sugar & Jaggery",
        "Edible Oils & Ghee",
        "Oils & Vinegar",
        "Spreads/Sauces/Ketchup",
        "Sauces/Spreads & Dips",
    ),
    "dry goods pasta": ("Dals & Pulses", "Rice & Rice Products", "Noodle/Pasta/Vermicelli"),
    "breakfast": ("Cereals & Breakfast", "Breakfast Cereals"),
    "snacks": (
        "Chocolates & Candies",
        "Chocolates & Biscuits",
        "Biscuits & Cookies",
        "Snacks & Namkeen",
        "Snacks/Dry Fruits/Nuts",
    ),
    "canned goods": ("Tinned & Processed Food",),
    "pets": ("Pet Food & Accessories",),
}

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class Catalogue:
    """Labelled product names: ``y[i]`` indexes ``labels``; ``parents`` maps each label to its department."""

    source: str
    task: str
    texts: list[str]
    y: np.ndarray
    labels: list[str]
    parents: dict[str, str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> Catalogue:
        """The rows at ``index`` (labels unchanged)."""
        return Catalogue(
            source=self.source,
            task=self.task,
            texts=[self.texts[i] for i in index],
            y=self.y[index],
            labels=self.labels,
            parents=self.parents,
            ids=[self.ids[i] for i in index],
        )

    def examples(self) -> list[tuple[str, str]]:
        """The rows as (text, label name) pairs."""
        return [(text, self.labels[int(label)]) for text, label in zip(self.texts, self.y, strict=True)]


@dataclass(frozen=True)
class Split:
    """Row indices of the three splits."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


@dataclass(frozen=True)
class DataSplit:
    """A catalogue's three splits as catalogues of their own, with the split's row indices."""

    split: Split
    train: Catalogue
    validation: Catalogue
    test: Catalogue

    @classmethod
    def of(cls, catalogue: Catalogue, split: Split) -> DataSplit:
        """The rows of ``catalogue`` that each part of ``split`` holds."""
        return cls(
            split=split,
            train=catalogue.subset(split.train),
            validation=catalogue.subset(split.validation),
            test=catalogue.subset(split.test),
        )


def normalise_name(text: str) -> str:
    """Grouping key: NFKC, lowercase, punctuation and spacing collapsed, so near-duplicates share a group."""
    folded = unicodedata.normalize("NFKC", text).lower()
    return _NON_ALNUM.sub(" ", folded).strip()


def grouped_split(texts: list[str], seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> Split:
    """Assign whole normalised-name groups to train/validation/test with a seeded permutation."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError("split fractions must sum to 1")
    keys = [normalise_name(t) for t in texts]
    groups = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(groups))
    n_train = round(fractions[0] * len(groups))
    n_val = round(fractions[1] * len(groups))
    part: dict[str, int] = {}
    for rank, g in enumerate(order):
        part[groups[g]] = 0 if rank < n_train else (1 if rank < n_train + n_val else 2)
    which = np.array([part[k] for k in keys], dtype=np.int64)
    return Split(
        train=np.flatnonzero(which == 0),
        validation=np.flatnonzero(which == 1),
        test=np.flatnonzero(which == 2),
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"catalogue file {path} does not exist; pass the instacart-products directory")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def load_instacart(data_dir: Path, task: str = "aisle", limit: int | None = None, seed: int = 0) -> Catalogue:
    """Instacart products with aisle or department labels, the unlabelled ``missing`` rows dropped.

    ``limit`` keeps a seeded random subset of rows (for tests on a slice of the real data).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    data_dir = Path(data_dir)
    aisles = {r["aisle_id"]: r["aisle"] for r in _read_csv(data_dir / "aisles.csv")}
    departments = {r["department_id"]: r["department"] for r in _read_csv(data_dir / "departments.csv")}
    rows = [
        r
        for r in _read_csv(data_dir / "products.csv")
        if aisles[r["aisle_id"]] != "missing"
        and departments[r["department_id"]] != "missing"
        and r["product_name"].strip()
    ]
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
        rows = [rows[i] for i in keep]
    aisle_parent = {aisles[r["aisle_id"]]: departments[r["department_id"]] for r in rows}
    if task == "aisle":
        names = [aisles[r["aisle_id"]] for r in rows]
        parents = aisle_parent
    else:
        names = [departments[r["department_id"]] for r in rows]
        parents = {d: d for d in set(names)}
    labels = sorted(set(names))
    index = {label: i for i, label in enumerate(labels)}
    return Catalogue(
        source=INSTACART_SOURCE,
        task=task,
        texts=[r["product_name"] for r in rows],
        y=np.array([index[n] for n in names], dtype=np.int64),
        labels=labels,
        parents={label: parents[label] for label in labels},
        ids=[r["product_id"] for r in rows],
    )


def _sub_key(sub_category: str) -> str:
    """SOURCE.md writes the file's "A, B & C" sub-categories as "A/B & C"; compare them modulo that."""
    return re.sub(r"\s*[,/]\s*", "/", sub_category.strip().lower())


def load_bigbasket_departments(data_dir: Path) -> tuple[list[str], list[str]]:
    """BigBasket product names whose sub_category maps to one Instacart department, with that department."""
    lookup = {_sub_key(sub): dept for dept, subs in BIGBASKET_TO_DEPARTMENT.items() for sub in subs}
    texts: list[str] = []
    departments: list[str] = []
    for row in _read_csv(Path(data_dir) / "bigbasket_products.csv"):
        name = (row.get("product") or "").strip()
        dept = lookup.get(_sub_key(row.get("sub_category") or ""))
        if name and dept is not None:
            texts.append(name)
            departments.append(dept)
    return texts, departments


# Demo data: synthetic grocery product names with an aisle > department hierarchy, for builds without real data.
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
    "Green Valley",
    "Sunrise",
    "Happy Farms",
    "Blue Ridge",
    "Nature's Best",
    "Kirkwood",
    "Maple Lane",
    "Golden Acre",
    "Urban Pantry",
    "Silver Spoon",
    "Harvest Moon",
    "Little Oak",
)
_MODIFIERS = ("Organic", "Low Fat", "Original", "Classic", "Family Size", "Gluten Free", "Natural", "Light", "")
_FLAVOURS = (
    "Vanilla",
    "Strawberry",
    "Honey",
    "Sea Salt",
    "Chocolate",
    "Lemon",
    "Peach",
    "Cinnamon",
    "Mint",
    "Plain",
    "",
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


def generate_shifted_demo_texts(n_rows: int, seed: int = 0, n_labels: int | None = None) -> list[str]:
    """Product names a model built on ``generate_demo_catalogue(..., n_labels)`` never saw the like of.

    Same shape (brand, modifier, flavour, head, size), but the heads come from the demo aisles left out
    of that catalogue, with brands reversed and sizes in other units: a shifted vocabulary for drift checks.
    """
    rng = np.random.default_rng(seed + 7919)
    kept = set(demo_aisles(n_labels))
    heads = [head for aisle, (_, names) in _AISLES.items() if aisle not in kept for head in names]
    if not heads:
        raise ValueError("every demo aisle is in the catalogue; nothing is left to shift to")
    brands = [brand[::-1].title() for brand in _BRANDS]
    sizes = ("3 kg", "750 g", "40 pk", "1.5 gal", "")
    return [
        " ".join(
            p
            for p in (
                brands[rng.integers(len(brands))],
                _FLAVOURS[rng.integers(len(_FLAVOURS))],
                heads[rng.integers(len(heads))].title(),
                sizes[rng.integers(len(sizes))],
            )
            if p
        )
        for _ in range(n_rows)
    ]


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


def load_split_for_manifest(manifest: Manifest, data_dir: Path | None) -> tuple[Catalogue, Split]:
    """Re-derive the catalogue and the exact split a model set was built with, from the manifest's data record."""
    data = manifest.data
    seed = int(data["seed"])
    if data["source"] == DEMO_SOURCE:
        catalogue = generate_demo_catalogue(int(data["demo_rows"]), seed=seed, n_labels=data.get("demo_labels"))
    elif data["source"] == INSTACART_SOURCE:
        if data_dir is None:
            raise ValueError(
                f"these models were built on {INSTACART_SOURCE}; pass its directory (--data DIR) to re-derive the split"
            )
        catalogue = load_instacart(Path(data_dir), task=manifest.task, limit=data.get("limit"), seed=seed)
    else:
        raise ManifestError(f"unknown data source {data['source']!r} in the manifest")
    if catalogue.labels != manifest.labels:
        raise ValueError(
            "the data's labels differ from the manifest's; is this the catalogue the models were built on?"
        )
    split = grouped_split(catalogue.texts, seed, tuple(data.get("fractions", SPLIT_FRACTIONS)))
    if split.sizes() != data.get("sizes", split.sizes()):
        raise ValueError(
            f"re-derived split sizes {split.sizes()} differ from the build's {data.get('sizes')}; "
            "the data directory does not hold the catalogue the models were built on"
        )
    return catalogue, split


def heldout_examples(model_dir: Path, data_dir: Path | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """(text, label) rows of the test split the models in ``model_dir`` never saw."""
    manifest = load_manifest(Path(model_dir), verify=False)
    catalogue, split = load_split_for_manifest(manifest, data_dir)
    rows = catalogue.subset(split.test).examples()
    return rows if limit is None else rows[:limit]
