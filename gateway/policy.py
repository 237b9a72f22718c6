"""The boundary policy: what of a row may leave the private side (personal data is redacted or kept back).

Pure Python on plain strings; no gRPC. The cascade applies it once, before any row is handed to a remote tier.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from tiergate.inputs import Row
from tiergate.settings import PolicySettings

_V = TypeVar("_V")


class Kind(StrEnum):
    """A kind of personal data a search query may carry."""

    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    POSTCODE = "postcode"


class Action(StrEnum):
    """What happens to a row in which personal data was found."""

    # The match is replaced by a typed placeholder; the rest of the row may still be escalated.
    REDACT = "redact"
    # The row is never sent to a remote tier; the first tier answers it (reason `private_data`).
    KEEP_PRIVATE = "keep_private"


PLACEHOLDERS: dict[Kind, str] = {kind: f"[{kind.value.upper()}]" for kind in Kind}

# When two findings overlap, the earlier kind here wins (an e-mail address may hold digits, a card
# number may look like a phone number), whichever kinds are enabled.
_PRIORITY = (Kind.EMAIL, Kind.CARD, Kind.PHONE, Kind.POSTCODE)

_EMAIL = re.compile(r"(?<![\w.%+'-])[\w.%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")
# A run of digit groups joined by up to three separators (spaces, dots, dashes, parentheses), with
# an optional leading "+". Each repetition must consume a digit, so matching stays linear.
_NUMBER = re.compile(r"\+?\(?[0-9](?:[ .()\-]{0,3}[0-9])*\)?")
_GROUP = re.compile(r"[0-9]+")
# What every kind's pattern needs somewhere in a text: an ASCII digit (numbers, postcodes) or an "@" (e-mail).
_CANDIDATE = re.compile(r"[0-9@]")
# The longest number any kind looks for: a 19-digit card.
_MAX_DIGITS = 19
# The most groups a card (4-4-4-4-3) or a national phone number is written in.
_MAX_GROUPS = 5
# UK postcodes: outward code, a space, inward code. The inward letters never use CIKMOV, which keeps
# "2ml", "2oz", "2ct" out; the space keeps part numbers such as "MD199HN" out.
_UK_POSTCODE = re.compile(
    r"(?<![\w-])(?:[A-PR-UWYZ][A-HK-Y]?[0-9][A-Z0-9]?|GIR) [0-9][ABD-HJLNP-UW-Z]{2}(?![\w-])", re.IGNORECASE
)
# Canadian postcodes: A9A 9A9 (no D F I O Q U), distinctive enough to match without a space.
_CA_POSTCODE = re.compile(
    r"(?<![\w-])[ABCEGHJ-NPRSTVXY][0-9][ABCEGHJ-NPRSTV-Z][ -]?[0-9][ABCEGHJ-NPRSTV-Z][0-9](?![\w-])", re.IGNORECASE
)
# Product names are full of bare five-digit item and model numbers ("Speedwav 77489 Handlebar"), so a
# bare five-digit number is a ZIP code only after words that announce a place: a keyword, or a US state
# code in capitals ("deliver to 94107", "near 10025", "zip 94107", "San Francisco, CA 94107").
_ZIP_CONTEXT = re.compile(
    r"(?:\b(?i:zip|zip ?code|post ?code|postal ?code|near|to|in|at|around|deliver|delivery|delivered|ship|shipping)"
    r"|\b(?:A[KLRZ]|C[AOT]|D[CE]|FL|GA|HI|I[ADLN]|K[SY]|LA|M[ADEINOST]|N[CDEHJMVY]|O[HKR]|PA|RI|S[CD]|T[NX]|UT|"
    r"V[AT]|W[AIVY]))[:,]? ?$"
)
# Inward codes that are units, not postcodes: "B12 1LB" reads as vitamin B12, one pound.
_UNIT_INWARD = frozenset({"lb", "gb", "tb", "pk"})


@dataclass(frozen=True)
class Finding:
    """One piece of personal data found in a row: its kind and its span in the text."""

    kind: Kind
    start: int
    end: int


@dataclass(frozen=True)
class Decision:
    """What may leave the private side for one row."""

    findings: tuple[Finding, ...]
    # The row a remote tier may be sent (a text redacted under `redact`); None: the row stays private.
    outbound: Row | None

    @property
    def private(self) -> bool:
        """True when the row must not be sent to any remote tier."""
        return self.outbound is None


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number passes."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def gtin_valid(digits: str) -> bool:
    """The GS1 check digit of a barcode number (EAN-13, GTIN-14)."""
    body, check = digits[:-1], int(digits[-1])
    weighted = sum(int(char) * (3 if position % 2 == 0 else 1) for position, char in enumerate(reversed(body)))
    return (10 - weighted % 10) % 10 == check


@dataclass(frozen=True)
class _Group:
    digits: str
    start: int
    end: int


def _groups(text: str, number: re.Match[str]) -> list[_Group]:
    """The digit groups of a number, minus end groups glued to letters ("A6000", "2GB" are codes and sizes)
    or continuing another number ("1,234", "0.12345")."""
    groups = [_Group(g[0], number.start() + g.start(), number.start() + g.end()) for g in _GROUP.finditer(number[0])]
    if groups and groups[0].start > 0 and (text[groups[0].start - 1].isalpha() or text[groups[0].start - 1] in ".,"):
        groups.pop(0)
    if groups and groups[-1].end < len(text) and text[groups[-1].end].isalpha():
        groups.pop()
    return groups


def _windows(groups: list[_Group], first: int, loose: bool) -> Iterator[tuple[list[_Group], str]]:
    """Runs of groups from `first` that could be a card, phone or ZIP code, longest first, with their digits.

    Only an international number (`loose`) has one-digit groups after its first ("+33 1 23 45 67 89") or more
    than five groups; those bounds keep a long run of digit groups ("12 12 12 ...") quick to scan.
    """
    found: list[tuple[list[_Group], str]] = []
    digits = ""
    for last in range(first, len(groups)):
        group = groups[last].digits
        if len(digits) + len(group) > _MAX_DIGITS or (
            not loose and last > first and (len(group) < 2 or last - first >= _MAX_GROUPS)
        ):
            break
        digits += group
        if len(digits) == 5 or len(digits) >= 9:
            found.append((groups[first : last + 1], digits))
    yield from reversed(found)


def _card(window: list[_Group], digits: str, text: str) -> bool:
    # Payment networks (ISO/IEC 7812 major industry identifiers 1 to 6) issue 13 to 19 digits.
    if len(digits) < 13 or digits[0] not in "123456":
        return False
    # Cards are written with single spaces or dashes between groups, if at all.
    if any(text[a.end : b.start] not in (" ", "-") for a, b in itertools.pairwise(window)):
        return False
    # A 13- or 14-digit run with a valid GS1 check digit is a barcode printed in a product name.
    if len(window) == 1 and len(digits) in (13, 14) and gtin_valid(digits):
        return False
    return luhn_valid(digits)


def _phone(window: list[_Group], digits: str, international: bool) -> bool:
    if international:
        # "+" and a country code: E.164 numbers have at most 15 digits; 9 keeps "+1 2 3" out.
        return 9 <= len(digits) <= 15
    sizes = [len(g.digits) for g in window]
    if len(digits) == 11 and digits[0] == "1":
        digits, sizes = digits[1:], (sizes[1:] if sizes[0] == 1 else [sizes[0] - 1, *sizes[1:]])
    if len(digits) == 10 and digits[0] in "23456789" and digits[3] in "23456789":
        # North American: (415) 555-0134, 415-555-0134, 415.555.0134, 4155550134.
        return sizes in ([10], [3, 7], [3, 3, 4], [6, 4])
    # National numbers with a trunk 0 (UK and much of Europe): 020 7946 0958, 07700 900123.
    return digits[0] == "0" and 10 <= len(digits) <= 11 and len(window) <= 4 and min(sizes) >= 2


def _zip(window: list[_Group], text: str) -> bool:
    sizes = [len(g.digits) for g in window]
    if sizes == [5, 4]:
        return text[window[0].end : window[1].start] == "-"
    if sizes != [5]:
        return False
    start, end = window[0].start, window[0].end
    # Decimals and codes are not ZIP codes: "12345.5", "73357-AV".
    if text[end : end + 1] in (".", "-"):
        return False
    return _ZIP_CONTEXT.search(text, max(0, start - 24), start) is not None


def _number_findings(text: str) -> Iterator[Finding]:
    for number in _NUMBER.finditer(text):
        groups = _groups(text, number)
        # "+" and a country code lead an international phone number (never a card).
        plus = number[0].startswith("+") and bool(groups) and groups[0].start == number.start() + 1
        for first in range(len(groups)):
            international = plus and first == 0
            for window, digits in _windows(groups, first, loose=international):
                start, end = window[0].start - (1 if international else 0), window[-1].end
                if not international and _card(window, digits, text):
                    yield Finding(Kind.CARD, start, end)
                elif _phone(window, digits, international):
                    # "(415) 555-0134": the parentheses go with the number.
                    if text[start - 1 : start] == "(" and text[window[0].end : window[0].end + 1] == ")":
                        start -= 1
                    yield Finding(Kind.PHONE, start, end)
                elif not international and _zip(window, text):
                    yield Finding(Kind.POSTCODE, start, end)


def _postcode_findings(text: str) -> Iterator[Finding]:
    for pattern in (_UK_POSTCODE, _CA_POSTCODE):
        for match in pattern.finditer(text):
            if match[0][-2:].lower() not in _UNIT_INWARD:
                yield Finding(Kind.POSTCODE, match.start(), match.end())


def _resolve(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping findings, in text order: by kind priority, then leftmost, then longest."""
    rank = {kind: index for index, kind in enumerate(_PRIORITY)}
    kept: list[Finding] = []
    for finding in sorted(findings, key=lambda f: (rank[f.kind], f.start, f.start - f.end)):
        if all(finding.end <= other.start or finding.start >= other.end for other in kept):
            kept.append(finding)
    return sorted(kept, key=lambda f: f.start)


class BoundaryPolicy:
    """Finds personal data in rows bound for a remote tier and redacts it, or keeps the row private.

    Request parameters never cross the boundary unless listed in `forward_parameters`.
    """

    def __init__(
        self,
        action: Action = Action.REDACT,
        kinds: Iterable[Kind] = tuple(Kind),
        forward_parameters: Iterable[str] = (),
    ) -> None:
        self.action = Action(action)
        self.kinds = frozenset(Kind(kind) for kind in kinds)
        self.forward_parameters = frozenset(forward_parameters)

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> BoundaryPolicy:
        """The policy the settings describe; unknown actions or kinds are refused with the known ones."""
        actions = [action.value for action in Action]
        if settings.action not in actions:
            raise ValueError(f"policy.action must be one of {', '.join(actions)}; got {settings.action!r}")
        known = [kind.value for kind in Kind]
        unknown = sorted(set(settings.kinds) - set(known))
        if unknown:
            raise ValueError(f"policy.kinds has unknown kinds {unknown}; known kinds: {', '.join(known)}")
        return cls(Action(settings.action), [Kind(kind) for kind in settings.kinds], settings.forward_parameters)

    def find(self, text: str) -> list[Finding]:
        """The personal data of the enabled kinds in `text`, in text order, without overlaps."""
        if not self.kinds:
            return []
        findings = [Finding(Kind.EMAIL, m.start(), m.end()) for m in _EMAIL.finditer(text)]
        findings += _number_findings(text)
        findings += _postcode_findings(text)
        # Overlaps are settled among all kinds first, so a disabled kind is not half-matched as another.
        return [finding for finding in _resolve(findings) if finding.kind in self.kinds]

    def redact(self, text: str) -> str:
        """`text` with every finding replaced by its kind's placeholder, e.g. `[EMAIL]`."""
        return self._redacted(text, self.find(text))

    def decide(self, text: Row) -> Decision:
        """What of one row may leave the private side under this policy. A tensor row holds numbers, not text:
        the policy finds nothing in it, and it leaves as it is."""
        if not isinstance(text, str):
            return Decision((), text)
        # Every kind needs a digit or an "@": most product names have neither, and need no closer look.
        findings = tuple(self.find(text)) if _CANDIDATE.search(text) else ()
        if not findings:
            return Decision(findings, text)
        if self.action is Action.KEEP_PRIVATE:
            return Decision(findings, None)
        return Decision(findings, self._redacted(text, findings))

    def apply(self, texts: Sequence[str]) -> list[Decision]:
        """Per row, what may leave the private side under this policy."""
        return [self.decide(text) for text in texts]

    def forwardable(self, parameters: Mapping[str, _V]) -> dict[str, _V]:
        """The request parameters that may be forwarded to a remote tier: only those the policy lists."""
        return {name: value for name, value in parameters.items() if name in self.forward_parameters}

    @staticmethod
    def _redacted(text: str, findings: Sequence[Finding]) -> str:
        parts, at = [], 0
        for finding in findings:
            parts += [text[at : finding.start], PLACEHOLDERS[finding.kind]]
            at = finding.end
        parts.append(text[at:])
        return "".join(parts)
