"""Queries as shoppers type them: the perturbation families are pure and seeded, and each does what it says."""

from __future__ import annotations

import random

import pytest

from training import augment

TEXTS = [
    "Organic Whole Milk 1 gal",
    "Sparkling Mineral Water Lime 12 oz",
    "Chocolate Chip Cookies",
    "Bananas",
    "Extra Virgin Olive Oil 500 ml",
]


@pytest.mark.parametrize("family", sorted(augment.FAMILIES))
def test_each_family_is_pure_and_seeded(family: str) -> None:
    perturb = augment.FAMILIES[family]
    first = augment.perturbed_copies(TEXTS, perturb, seed=7)
    assert augment.perturbed_copies(TEXTS, perturb, seed=7) == first, "the same seed gives the same copies"
    others = [augment.perturbed_copies(TEXTS, perturb, seed=s) for s in range(8, 20)]
    assert any(copy != first for copy in others), "another seed gives other copies"
    assert TEXTS[0] == "Organic Whole Milk 1 gal", "the input is not changed"


def test_typo_changes_one_inner_letter_of_a_long_word() -> None:
    rng = random.Random(0)
    for _ in range(200):
        out = augment.typo("Sparkling Water", rng)
        changed = [(a, b) for a, b in zip(["Sparkling", "Water"], out.split(), strict=True) if a != b]
        assert len(changed) == 1
        before, after = changed[0]
        assert abs(len(before) - len(after)) <= 1 and before[0] == after[0] and before[-1] == after[-1]
    assert augment.typo("1 gal", rng) == "1 gal", "nothing to slip on: unchanged"


def test_casing_drop_reorder_and_abbreviate() -> None:
    rng = random.Random(1)
    cased = {augment.casing("Chocolate chip COOKIES", rng) for _ in range(50)}
    assert cased == {"CHOCOLATE CHIP COOKIES", "chocolate chip cookies", "Chocolate Chip Cookies"}
    dropped = augment.drop_word("Organic Whole Milk", rng)
    assert len(dropped.split()) == 2 and set(dropped.split()) < {"Organic", "Whole", "Milk"}
    assert augment.drop_word("Bananas ripe", rng) == "Bananas ripe", "two words: nothing left out"
    swapped = augment.reorder("Organic Whole Milk", rng)
    assert sorted(swapped.split()) == ["Milk", "Organic", "Whole"] and swapped != "Organic Whole Milk"
    short = augment.abbreviate("Chocolate Cookies", rng)
    assert short.split()[0] in {"Cho", "Choc", "Cho.", "Choc."} or short.split()[1] in {"Coo", "Cook", "Coo.", "Cook."}


def test_pack_size_rewrites_a_size_or_adds_one() -> None:
    rng = random.Random(2)
    sizes = {augment.pack_size("Sparkling Water 12 oz", rng) for _ in range(60)}
    assert "Sparkling Water 12oz" in sizes and "Sparkling Water 12 ounce" in sizes
    assert all(size.startswith("Sparkling Water 12") for size in sizes)
    added = augment.pack_size("Bananas", rng)
    assert added.startswith("Bananas ") and any(ch.isdigit() for ch in added)


def test_augmented_keeps_the_originals_first_and_labels_aligned() -> None:
    labels = list(range(len(TEXTS)))
    texts, ys = augment.augmented(TEXTS, labels, copies=2, seed=3)
    assert texts[: len(TEXTS)] == TEXTS and len(texts) == 3 * len(TEXTS)
    assert ys == labels * 3
    assert augment.augmented(TEXTS, labels, copies=2, seed=3) == (texts, ys)
