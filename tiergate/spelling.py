"""Query spelling correction: a word the model never saw, one keyboard slip away from a word it did, is read as
that word.

Shoppers misspell; a product catalogue does not. Both tiers of a text model read a query through the same
vocabulary, built from the training rows (``Vocabulary.from_texts``) and shipped beside the model as
``spelling.json``. A query word is left alone when it is in the vocabulary, is shorter than ``min_length`` or is
not all letters (sizes, codes); otherwise it becomes the most frequent vocabulary word within one edit (a letter
inserted, dropped, replaced, or two neighbours swapped: the optimal-string-alignment distance), if there is one.
Only the words corrected change; the rest of the text is passed on as it came. A word next to a combining mark
("cafe" then U+0301) is left as typed: a word ends before the mark, and the featurizers normalise such text themselves.

Candidates are found the SymSpell way: every vocabulary word is indexed under itself and each of its one-letter
deletions, so a query word needs only its own deletions looked up, not a scan of the vocabulary.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tiergate.features import HashedNgramFeaturizer
from tiergate.inputs import Row

# Words are looked up as the edge's featurizer reads them: NFKC and lower case.
_normalise = HashedNgramFeaturizer.normalise

FORMAT = 1
# A word must be this long to be corrected or to be offered as a correction: shorter ones are one edit from
# too many others ("lie", "lime", "line").
MIN_LENGTH = 4
# A word offered as a correction appears at least this often in the training rows (a word seen once may itself be
# a misspelling).
MIN_COUNT = 2
_WORD = re.compile(r"\w+", re.UNICODE)
_CACHE_LIMIT = 100_000


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def within_one_edit(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ by at most one insertion, deletion, substitution or adjacent swap."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        if a[i + 1 :] == b[i + 1 :]:
            return True  # one substitution
        return i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2 :] == b[i + 2 :]
    if la > lb:
        return a[i + 1 :] == b[i:]
    return a[i:] == b[i + 1 :]


class Vocabulary:
    """Word counts from the training rows, and the deletion index over the words offered as corrections."""

    def __init__(self, counts: dict[str, int], min_length: int = MIN_LENGTH, min_count: int = MIN_COUNT) -> None:
        if min_length < 2 or min_count < 1:
            raise ValueError(f"min_length must be at least 2 and min_count at least 1; got {min_length}, {min_count}")
        self.counts = dict(counts)
        self.min_length = int(min_length)
        self.min_count = int(min_count)
        self._index: dict[str, list[str]] = {}
        longest = 0
        for word, count in self.counts.items():
            if count >= min_count and len(word) >= min_length and word.isalpha():
                longest = max(longest, len(word))
                for key in _deletions(word) | {word}:
                    self._index.setdefault(key, []).append(word)
        # No word offered is within one edit of a longer word than this: such words are answered at once, and
        # neither their deletions (quadratic in the length) nor a cache entry are paid for.
        self._longest = longest + 1
        self._corrected: dict[str, str] = {}

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_length: int = MIN_LENGTH, min_count: int = MIN_COUNT) -> Vocabulary:
        """The vocabulary of ``texts`` (case-folded words)."""
        counts = Counter(_normalise(word) for text in texts for word in _WORD.findall(text))
        return cls(dict(sorted(counts.items())), min_length, min_count)

    def correct_word(self, word: str) -> str:
        """``word`` (case-folded) corrected, or unchanged when it needs or has no correction."""
        if word in self.counts or not self.min_length <= len(word) <= self._longest or not word.isalpha():
            return word
        cached = self._corrected.get(word)
        if cached is not None:
            return cached
        candidates = {c for key in _deletions(word) | {word} for c in self._index.get(key, ())}
        matches = [c for c in candidates if within_one_edit(word, c)]
        # Most frequent first; ties by the word itself, so the answer never depends on set order.
        best = max(matches, key=lambda c: (self.counts[c], c)) if matches else word
        if len(self._corrected) >= _CACHE_LIMIT:
            self._corrected.clear()
        self._corrected[word] = best
        return best

    def correct(self, text: str) -> str:
        """``text`` with each word that needs a correction replaced by it (case-folded); the rest as it came."""

        def fix(match: re.Match[str]) -> str:
            word = match.group(0)
            start, end = match.span()
            if (end < len(text) and unicodedata.combining(text[end])) or (
                start > 0 and unicodedata.combining(text[start - 1])
            ):
                return word
            folded = _normalise(word)
            fixed = self.correct_word(folded)
            return word if fixed == folded else fixed

        return _WORD.sub(fix, text)

    def correct_rows(self, rows: Sequence[Row]) -> list[Row]:
        """Text rows corrected; tensor rows as they are."""
        return [self.correct(row) if isinstance(row, str) else row for row in rows]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``spelling.json``."""
        return {"format": FORMAT, "min_length": self.min_length, "min_count": self.min_count, "counts": self.counts}

    def save(self, path: Path) -> Path:
        """Write ``spelling.json`` (keys sorted, so the same rows always give the same bytes)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read ``spelling.json``; ValueError naming the file when it is not one."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            if int(raw["format"]) != FORMAT:
                raise ValueError(f"format {raw['format']} is not supported (expected {FORMAT})")
            counts = {str(word): int(count) for word, count in raw["counts"].items()}
            return cls(counts, int(raw["min_length"]), int(raw["min_count"]))
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"spelling vocabulary {Path(path).name} is unreadable: {error}") from None
