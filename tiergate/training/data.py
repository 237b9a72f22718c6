"""Catalogue loading (Instacart, BigBasket, demo) and the deterministic grouped train/validation/test split."""

from __future__ import annotations

import csv
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TASKS = ("aisle", "department")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
INSTACART_SOURCE = "instacart-products"
BIGBASKET_SOURCE = "bigbasket-products"

# BigBasket sub_category -> Instacart department, from bigbasket-products/SOURCE.md.
BIGBASKET_TO_DEPARTMENT: dict[str, tuple[str, ...]] = {
    "babies": ("Baby Bath & Hygiene", "Diapers & Wipes", "Baby Food & Formula", "Feeding & Nursing", "Baby Accessories"),
    "bakery": ("Breads & Buns", "Cakes & Pastries", "Gourmet Breads"),
    "dairy eggs": ("Dairy", "Eggs", "Dairy & Cheese"),
    "frozen": ("Ice Creams & Desserts", "Frozen Veggies & Snacks"),
    "personal care": (
        "Bath & Hand Wash", "Feminine Hygiene", "Fragrances & Deos", "Hair Care", "Health & Medicine",
        "Makeup", "Men's Grooming", "Oral Care", "Skin Care",
    ),
    "beverages": ("Coffee", "Energy & Soft Drinks", "Fruit Juices & Drinks", "Tea", "Water", "Drinks & Beverages"),
    "household": (
        "All Purpose Cleaners", "Detergents & Dishwash", "Disposables/Garbage Bag", "Fresheners & Repellents",
        "Mops/Brushes & Scrubs",
    ),
    "meat seafood": ("Fish & Seafood", "Mutton & Lamb", "Pork & Other Meats", "Sausages/Bacon & Salami"),
    "produce": (
        "Fresh Fruits", "Fresh Vegetables", "Exotic Fruits & Veggies", "Organic Fruits & Vegetables",
        "Herbs & Seasonings", "Cuts & Sprouts",
    ),
    "pantry": (
        "Masalas & Spices", "Salt/Sugar & Jaggery", "Edible Oils & Ghee", "Oils & Vinegar",
        "Spreads/Sauces/Ketchup", "Sauces/Spreads & Dips",
    ),
    "dry goods pasta": ("Dals & Pulses", "Rice & Rice Products", "Noodle/Pasta/Vermicelli"),
    "breakfast": ("Cereals & Breakfast", "Breakfast Cereals"),
    "snacks": (
        "Chocolates & Candies", "Chocolates & Biscuits", "Biscuits & Cookies", "Snacks & Namkeen",
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


@dataclass(frozen=True)
class Split:
    """Row indices of the three splits."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def normalise_name(text: str) -> str:
    """Grouping key: NFKC, lowercase, punctuation and spacing collapsed, so near-duplicates share a group."""
    folded = unicodedata.normalize("NFKC", text).lower()
    return _NON_ALNUM.sub(" ", folded).strip()


def grouped_split(
    texts: list[str], seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
) -> Split:
    """Assign whole normalised-name groups to train/validation/test with a seeded permutation."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError("split fractions must sum to 1")
    keys = [normalise_name(t) for t in texts]
    groups = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(groups))
    n_train = int(round(fractions[0] * len(groups)))
    n_val = int(round(fractions[1] * len(groups)))
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
        if aisles[r["aisle_id"]] != "missing" and departments[r["department_id"]] != "missing"
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
