"""The response cache: the normalised key, both bounds, the TTL and invalidation on a new model version."""

from __future__ import annotations

import pytest

from gateway.cache import ResponseCache, normalise


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock | None = None, **overrides: float) -> ResponseCache[str]:
    options: dict[str, float] = {"max_entries": 100, "max_bytes": 1_000_000, "ttl_s": 60.0} | overrides
    return ResponseCache(
        max_entries=int(options["max_entries"]),
        max_bytes=int(options["max_bytes"]),
        ttl_s=options["ttl_s"],
        size_of=lambda label: len(label.encode()),
        clock=clock or Clock(),
    )


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("Organic  Bananas ", "organic bananas"),
        ("  ORGANIC\tbananas!!", "organic bananas"),
        ("«organic bananas»", "organic bananas"),
        ("ＯＲＧＡＮＩＣ bananas", "organic bananas"),  # full-width letters, NFKC
        ("Straße", "strasse"),  # case folding, not just lower()
        ("2% milk", "2% milk"),  # punctuation inside stays
        ("...", ""),
    ],
)
def test_queries_normalise_as_shoppers_mean_them(typed: str, meant: str) -> None:
    assert normalise(typed) == meant


def test_a_hit_needs_the_same_version_hint_and_normalised_text() -> None:
    c = cache()
    c.store("v1", "auto", ["Organic  Bananas "], ["bananas"])
    assert c.lookup("v1", "auto", ["organic bananas", "ORGANIC BANANAS!", "apples"]) == ["bananas", "bananas", None]
    assert c.lookup("v1", "cloud", ["organic bananas"]) == [None]
    assert (c.hits, c.misses) == (2, 2)
    # A new model version drops everything, also for the old version's keys.
    assert c.lookup("v2", "auto", ["organic bananas"]) == [None]
    assert c.lookup("v1", "auto", ["organic bananas"]) == [None]
    assert c.stats().entries == 0


def test_the_entry_bound_evicts_the_least_recently_used() -> None:
    c = cache(max_entries=2)
    c.store("v1", "auto", ["a", "b"], ["A", "B"])
    assert c.lookup("v1", "auto", ["a"]) == ["A"]  # "a" is now the most recently used
    c.store("v1", "auto", ["c"], ["C"])
    assert c.lookup("v1", "auto", ["a", "b", "c"]) == ["A", None, "C"]
    assert c.stats().entries == 2


def test_the_byte_bound_holds_and_an_answer_larger_than_the_cache_is_not_kept() -> None:
    c = cache(max_bytes=1000)
    labels = [f"label-{n}" * 10 for n in range(20)]  # about 270 bytes each with the overhead
    c.store("v1", "auto", [f"q{n}" for n in range(20)], labels)
    stats = c.stats()
    assert stats.bytes <= 1000 and 1 <= stats.entries <= 3
    assert c.lookup("v1", "auto", ["q19"]) == [labels[19]]
    c.store("v1", "auto", ["huge"], ["x" * 5000])
    assert c.lookup("v1", "auto", ["huge"]) == [None]


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    c = cache(clock, ttl_s=10.0)
    c.store("v1", "auto", ["milk"], ["dairy"])
    clock.now = 9.0
    assert c.lookup("v1", "auto", ["milk"]) == ["dairy"]
    clock.now = 10.5
    assert c.lookup("v1", "auto", ["milk"]) == [None]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        cache(max_entries=0)
