"""Text features both tiers share: hashed word and character n-gram ids, and the subword tokenizer helpers."""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

_TOKEN = re.compile(r"\w+", re.UNICODE)
# Distinct crc32 seeds keep word and character n-grams in separate hash spaces
# without building prefixed strings per feature.
_WORD_SEED = 0x5EED0001
_CHAR_SEED = 0x5EED0002


class _Word(NamedTuple):
    """One word's share of the features: its seeded crc32, its unigram id, " word" for the n-grams it ends, and
    its character n-gram ids."""

    seeded: int
    unigram: int
    spaced: bytes
    chars: list[int]


class HashedNgramFeaturizer:
    """Maps text to a fixed-width row of hashed word and character n-gram ids (0 is padding).

    Hashing uses ``zlib.crc32`` so ids are identical across processes and machines,
    unlike Python's salted ``hash()``.
    """

    def __init__(
        self,
        n_buckets: int = 2**18,
        max_features: int = 96,
        word_ngrams: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] = (3, 5),
    ) -> None:
        if n_buckets < 2:
            raise ValueError("n_buckets must be at least 2")
        if max_features < 1:
            raise ValueError("max_features must be positive")
        self.n_buckets = int(n_buckets)
        self.max_features = int(max_features)
        self.word_ngrams = (int(word_ngrams[0]), int(word_ngrams[1]))
        if self.word_ngrams[0] < 1 and self.word_ngrams[1] >= self.word_ngrams[0]:
            raise ValueError(f"word n-gram sizes start at 1, got {self.word_ngrams}; (1, 0) means none")
        self.char_ngrams = (int(char_ngrams[0]), int(char_ngrams[1]))
        self._modulus = self.n_buckets - 1
        # Product names reuse a small vocabulary, so what each word contributes (its hash, unigram id and
        # character n-gram ids) is memoised; the cache is bounded and simply reset when it fills.
        self._word_cache: dict[str, _Word] = {}
        self._cache_limit = 200_000

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description that ``from_config`` turns back into this featurizer."""
        return {
            "kind": "hashed_ngram",
            "hash": "crc32",
            "n_buckets": self.n_buckets,
            "max_features": self.max_features,
            "word_ngrams": list(self.word_ngrams),
            "char_ngrams": list(self.char_ngrams),
        }

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> HashedNgramFeaturizer:
        """Rebuild a featurizer from ``config()`` output (as stored in the manifest)."""
        kind = d.get("kind", "hashed_ngram")
        if kind != "hashed_ngram" or d.get("hash", "crc32") != "crc32":
            raise ValueError(f"unsupported featurizer config: kind={kind!r} hash={d.get('hash')!r}")
        return cls(
            n_buckets=int(d["n_buckets"]),
            max_features=int(d["max_features"]),
            word_ngrams=(int(d["word_ngrams"][0]), int(d["word_ngrams"][1])),
            char_ngrams=(int(d["char_ngrams"][0]), int(d["char_ngrams"][1])),
        )

    @staticmethod
    def normalise(text: str) -> str:
        """NFKC plus lowercase: the only text normalisation the edge applies."""
        return unicodedata.normalize("NFKC", text).lower()

    def features(self, text: str) -> list[int]:
        """Hashed ids (1..n_buckets-1) for one text: word n-grams first, then character n-grams."""
        entries = [self._word(word) for word in _TOKEN.findall(self.normalise(text))]
        crc32 = zlib.crc32
        modulus = self._modulus
        limit = self.max_features
        out: list[int] = []
        w_lo, w_hi = self.word_ngrams
        for n in range(w_lo, w_hi + 1):
            if n == 1:
                out.extend(entry.unigram for entry in entries)
                continue
            for i in range(len(entries) - n + 1):
                # crc32 continues from a running value: the hash of "w1 w2" is the hash of " w2" from w1's.
                value = entries[i].seeded
                for entry in entries[i + 1 : i + n]:
                    value = crc32(entry.spaced, value)
                out.append(value % modulus + 1)
        if self.char_ngrams[1] > 0:
            for entry in entries:
                out.extend(entry.chars)
                if len(out) >= limit:
                    break
        return out[:limit]

    def _word(self, word: str) -> _Word:
        """What one word contributes, memoised: product names reuse a small vocabulary."""
        cache = self._word_cache
        entry = cache.get(word)
        if entry is None:
            encoded = word.encode("utf-8")
            seeded = zlib.crc32(encoded, _WORD_SEED)
            chars = self._char_ids(word) if self.char_ngrams[1] > 0 else []
            entry = _Word(seeded, seeded % self._modulus + 1, b" " + encoded, chars)
            if len(cache) >= self._cache_limit:
                cache.clear()
            cache[word] = entry
        return entry

    def _char_ids(self, word: str) -> list[int]:
        """Character n-gram ids of one word wrapped in boundary markers ``<word>``."""
        crc32 = zlib.crc32
        modulus = self._modulus
        marked = b"<" + word.encode("utf-8") + b">"
        size = len(marked)
        c_lo, c_hi = self.char_ngrams
        return [
            crc32(marked[i : i + n], _CHAR_SEED) % modulus + 1
            for n in range(c_lo, min(c_hi, size) + 1)
            for i in range(size - n + 1)
        ]

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [n, max_features] ids, zero-padded on the right."""
        if isinstance(texts, str):
            raise TypeError("transform expects a sequence of strings, not a single string")
        ids = np.zeros((len(texts), self.max_features), dtype=np.int32)
        for row, text in enumerate(texts):
            feats = self.features(text)
            if feats:
                ids[row, : len(feats)] = feats
        return ids


class NgramBlocks:
    """Several hashed n-gram featurizers side by side: ids [n, sum of widths], one block after another.

    The cloud's lexical branch weighs each block on its own (word n-grams as much as character
    n-grams, whatever their counts), so it needs to know where each block starts. Each block hashes into its own
    number of buckets: an edge graph that carries the lexical branch reads its MLP's block and the branch's
    blocks from one row, each into its own tables.
    """

    def __init__(self, blocks: Sequence[HashedNgramFeaturizer]) -> None:
        if not blocks:
            raise ValueError("NgramBlocks needs at least one featurizer")
        self.blocks = list(blocks)
        self.widths = [b.max_features for b in self.blocks]

    def config(self) -> dict[str, Any]:
        """JSON form; ``from_config`` reads it back."""
        return {"kind": "hashed_ngram_blocks", "blocks": [b.config() for b in self.blocks]}

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> NgramBlocks:
        """Rebuild from ``config()`` output (as stored in the manifest)."""
        if d.get("kind") != "hashed_ngram_blocks" or not isinstance(d.get("blocks"), list):
            raise ValueError(f"unsupported n-gram blocks config: kind={d.get('kind')!r}")
        return cls([HashedNgramFeaturizer.from_config(block) for block in d["blocks"]])

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [n, sum of widths]: each block's ids, zero-padded within its block."""
        return np.concatenate([b.transform(texts) for b in self.blocks], axis=1)


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The padding id a tokenizer.json declares, else the id of ``[PAD]``, else 0."""
    padding = tokenizer.padding
    if padding is not None:
        return int(padding.get("pad_id", 0))
    pad = tokenizer.token_to_id("[PAD]")
    return 0 if pad is None else int(pad)


def prepare_tokenizer(tokenizer: Tokenizer, max_length: int) -> int:
    """Turn off built-in padding, truncate at ``max_length``; return the pad id for ``encode_batch``."""
    pad_id = pad_id_of(tokenizer)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return pad_id


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 input_ids and attention_mask [n, longest in batch]; training and serving share this."""
    encodings = tokenizer.encode_batch(list(texts))
    longest = max(1, max((len(e.ids) for e in encodings), default=1))
    input_ids = np.full((len(encodings), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), longest), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        size = len(encoding.ids)
        input_ids[row, :size] = encoding.ids
        mask[row, :size] = 1
    return input_ids, mask
