"""Queries as shoppers type them: seeded, pure perturbations of product names.

Each family takes a text and a `random.Random` and returns a new text; none reads global state, so the same
seed always gives the same copies (the build's determinism rests on it). The families, documented in the
evaluation report too:

- `typo`: one keyboard slip in a word of 4+ letters: a neighbouring key, a dropped, doubled or swapped letter.
- `casing`: all upper case, all lower case, or every word capitalised.
- `drop_word`: one word left out (texts of 3+ words).
- `reorder`: two words swapped (texts of 2+ words).
- `abbreviate`: one word of 5+ letters cut to its first 3 or 4 letters, sometimes with a full stop.
- `pack_size`: a size or pack count written another way ("12 oz" -> "12oz" or "12 ounce"), or one added.

`perturb` applies one family chosen at random; `misspell` is the typo family applied once or twice.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

_WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)
_LONG_WORD = re.compile(r"[^\W\d_]{5,}", re.UNICODE)
_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _row_index, _row in enumerate(_KEYBOARD):
    for _col, _key in enumerate(_row):
        near = set()
        for d_row in (-1, 0, 1):
            other_row = _row_index + d_row
            if 0 <= other_row < len(_KEYBOARD):
                for d_col in (-1, 0, 1):
                    col = _col + d_col
                    if 0 <= col < len(_KEYBOARD[other_row]) and (d_row, d_col) != (0, 0):
                        near.add(_KEYBOARD[other_row][col])
        _NEIGHBOURS[_key] = "".join(sorted(near))
# Sizes and counts as catalogues write them, and other ways shoppers write the same.
_UNITS = {
    "oz": ("oz", "ounce", "ounces", "OZ"),
    "fl oz": ("fl oz", "floz", "fl. oz."),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "ct": ("ct", "count", "pack", "pk"),
    "g": ("g", "gram", "grams", "gr"),
    "ml": ("ml", "mL", "milliliter"),
    "l": ("l", "liter", "litre", "ltr"),
    "pack": ("pack", "pk", "ct", "count"),
    "kg": ("kg", "kilo", "kgs"),
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(fl oz|oz|lb|ct|ml|kg|g|l|pack)\b", re.IGNORECASE)
_ADDED_SIZES = ("12 oz", "6 pack", "1 lb", "16 oz", "2 ct", "500 g", "1 l", "24 ct")


def _pick_word(text: str, pattern: re.Pattern[str], rng: random.Random) -> re.Match[str] | None:
    words = list(pattern.finditer(text))
    return rng.choice(words) if words else None


def typo(text: str, rng: random.Random) -> str:
    """One keyboard slip in a word of 4+ letters (the text as it is when it has none)."""
    match = _pick_word(text, _WORD, rng)
    if match is None:
        return text
    word = match.group()
    i = rng.randrange(1, len(word) - 1)  # first and last letters stay: shoppers rarely slip there
    kind = rng.choice(("neighbour", "drop", "double", "swap"))
    if kind == "neighbour":
        near = _NEIGHBOURS.get(word[i].lower(), "")
        slipped = word[:i] + (rng.choice(near) if near else word[i]) + word[i + 1 :]
    elif kind == "drop":
        slipped = word[:i] + word[i + 1 :]
    elif kind == "double":
        slipped = word[: i + 1] + word[i:]
    else:  # two inner letters swapped
        i = min(i, len(word) - 3)
        slipped = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return text[: match.start()] + slipped + text[match.end() :]


def casing(text: str, rng: random.Random) -> str:
    """All upper, all lower, or every word capitalised."""
    kind = rng.choice(("upper", "lower", "title"))
    if kind == "upper":
        return text.upper()
    if kind == "lower":
        return text.lower()
    return " ".join(word[:1].upper() + word[1:].lower() for word in text.split(" "))


def drop_word(text: str, rng: random.Random) -> str:
    """One word left out (texts of 3+ words; shorter ones as they are)."""
    words = text.split()
    if len(words) < 3:
        return text
    del words[rng.randrange(len(words))]
    return " ".join(words)


def reorder(text: str, rng: random.Random) -> str:
    """Two words swapped (texts of 2+ words)."""
    words = text.split()
    if len(words) < 2:
        return text
    i, j = rng.sample(range(len(words)), 2)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def abbreviate(text: str, rng: random.Random) -> str:
    """One word of 5+ letters cut to its first 3 or 4 letters, with a full stop half the time."""
    match = _pick_word(text, _LONG_WORD, rng)
    if match is None:
        return text
    short = match.group()[: rng.choice((3, 4))] + ("." if rng.random() < 0.5 else "")
    return text[: match.start()] + short + text[match.end() :]


def pack_size(text: str, rng: random.Random) -> str:
    """A size written another way ("12 oz" -> "12oz", "12 ounce"), or, when the text has none, one added."""
    match = _SIZE.search(text)
    if match is None:
        return f"{text} {rng.choice(_ADDED_SIZES)}"
    number, unit = match.group(1), match.group(2).lower()
    spelled = rng.choice(_UNITS.get(unit, (unit,)))
    joined = rng.choice(("", " "))
    return text[: match.start()] + f"{number}{joined}{spelled}" + text[match.end() :]


FAMILIES: dict[str, Callable[[str, random.Random], str]] = {
    "typo": typo,
    "casing": casing,
    "drop_word": drop_word,
    "reorder": reorder,
    "abbreviate": abbreviate,
    "pack_size": pack_size,
}


def misspell(text: str, rng: random.Random) -> str:
    """One or two typos."""
    text = typo(text, rng)
    return typo(text, rng) if rng.random() < 0.5 else text


def perturb(text: str, rng: random.Random) -> str:
    """One family, chosen at random."""
    return FAMILIES[rng.choice(sorted(FAMILIES))](text, rng)


def perturbed_copies(texts: Sequence[str], family: Callable[[str, random.Random], str], seed: int) -> list[str]:
    """`family` applied to every text with one generator seeded `seed`: the same texts and seed, the same copies."""
    rng = random.Random(seed)
    return [family(text, rng) for text in texts]


def augmented(texts: Sequence[str], labels: Sequence[int], copies: int, seed: int) -> tuple[list[str], list[int]]:
    """The texts followed by `copies` perturbed copies of each (one random family per copy), with their labels:
    what the edge trains on, so it has seen queries typed the way shoppers type them."""
    rng = random.Random(seed)
    out_texts, out_labels = list(texts), list(labels)
    for _ in range(copies):
        for text, label in zip(texts, labels, strict=True):
            out_texts.append(perturb(text, rng))
            out_labels.append(label)
    return out_texts, out_labels
