"""The response cache: final answers by model version and the query as shoppers type it, LRU with a TTL, bounded
by entries and by bytes.

"Organic  Bananas " and "organic bananas" share one entry: the key is the text under Unicode NFKC, case folding,
collapsed whitespace and punctuation stripped at the ends. Only final answers are kept, with the tier that gave
them: never a row answered below the tier it needed (a failed or out-of-time tier, a hedge cut short).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import TTLCache

from tiergate.inputs import Row, Vector

V = TypeVar("V")
_SPACE = re.compile(r"\s+", re.UNICODE)
# Punctuation and symbols stripped from both ends (Unicode categories P* and S*); inside a query they stay.
_EDGE_CLASSES = ("P", "S")
# A key and its entry in the cache cost about this much besides the strings themselves.
_ENTRY_OVERHEAD_BYTES = 200


def cache_key(row: Row) -> str | bytes:
    """A text's key is the text normalised; a tensor row's, its datatype, shape and bytes."""
    return row.key if isinstance(row, Vector) else normalise(row)


def normalise(text: str) -> str:
    """The query as a shopper means it: NFKC, case-folded, whitespace collapsed, punctuation stripped at the ends."""
    folded = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    start, end = 0, len(folded)
    while start < end and unicodedata.category(folded[start])[0] in _EDGE_CLASSES:
        start += 1
    while end > start and unicodedata.category(folded[end - 1])[0] in _EDGE_CLASSES:
        end -= 1
    return folded[start:end].strip()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int


class ResponseCache(Generic[V]):
    """Answers by (model version, routing hint, normalised text); a new model version drops every entry."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        size_of: Callable[[V], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("the response cache needs max_entries >= 1, max_bytes >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self._size_of = size_of
        # Each entry is (answer, its bytes: the answer, the key's text and the overhead), weighed by those bytes.
        self._entries: TTLCache[Hashable, tuple[V, int]] = TTLCache(
            maxsize=max_bytes, ttl=ttl_s, timer=clock, getsizeof=lambda entry: entry[1]
        )
        self._version = ""
        self.hits = 0
        self.misses = 0

    def _check_version(self, version: str) -> None:
        if version != self._version:
            self._entries.clear()
            self._version = version

    def lookup(self, version: str, hint: str, texts: Sequence[Row]) -> list[V | None]:
        """Per text, its cached answer or None."""
        self._check_version(version)
        found: list[V | None] = []
        for text in texts:
            entry = self._entries.get((hint, cache_key(text)))
            found.append(None if entry is None else entry[0])
        hits = sum(value is not None for value in found)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def store(self, version: str, hint: str, texts: Sequence[Row], values: Sequence[V]) -> None:
        """Keep `values` (final answers only: the caller filters) for `texts` under `version`."""
        self._check_version(version)
        for text, value in zip(texts, values, strict=True):
            key = (hint, cache_key(text))
            raw = key[1]
            size = self._size_of(value) + len(raw if isinstance(raw, bytes) else raw.encode("utf-8"))
            size += _ENTRY_OVERHEAD_BYTES
            if size > self._entries.maxsize:
                continue  # larger than the whole cache: not kept
            if key not in self._entries:
                self._entries.expire()
                while len(self._entries) >= self.max_entries:
                    self._entries.popitem()  # the least recently used
            self._entries[key] = (value, size)

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, len(self._entries), int(self._entries.currsize))
