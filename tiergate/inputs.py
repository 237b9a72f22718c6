"""Rows as every tier takes them, and the ONNX inputs ("feeds") a tier makes of them.

A row is a text (`str`) for a text model, or a `Vector` for a tensor model: one row of the declared tensor,
its per-row shape and datatype. A tier's `Feeds` turns a batch of rows into its ONNX graph's inputs: hashed
n-gram ids, a `tokenizers` tokenizer's ids and mask, or the rows stacked as they came. Each feed is cast to
the datatype its graph input declares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tiergate.features import HashedNgramFeaturizer, NgramBlocks, encode_batch, prepare_tokenizer


class Vector:
    """One row of a tensor model's input: a numeric array of the model's per-row shape, compared and hashed by
    its bytes (so the response cache can key on it)."""

    __slots__ = ("_key", "values")

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self._key = f"{values.dtype.str}{values.shape}".encode() + values.tobytes()

    @property
    def key(self) -> bytes:
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Vector({self.values.tolist()!r})"


# One row of a request.
Row = str | Vector
# A tier's ONNX inputs for a batch of rows, by input name.
Feeds = Callable[[Sequence[Row]], dict[str, np.ndarray]]

# ONNX Runtime's type names of the inputs a feed can fill.
_ONNX_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}
TOKEN_IDS, ATTENTION_MASK, TOKEN_TYPES, NGRAM_IDS = "input_ids", "attention_mask", "token_type_ids", "ngram_ids"


def texts_of(rows: Sequence[Row]) -> list[str]:
    """The rows as texts (TypeError when one is not)."""
    if isinstance(rows, str):
        raise TypeError("expected a sequence of rows, not a single string")
    texts = list(rows)
    for row in texts:
        if not isinstance(row, str):
            raise TypeError(f"this tier takes texts; got {type(row).__name__}")
    return texts  # type: ignore[return-value]  # checked above


def stack(rows: Sequence[Row]) -> np.ndarray:
    """Tensor rows as one array [n, *row shape]."""
    values = []
    for row in rows:
        if not isinstance(row, Vector):
            raise TypeError(f"this tier takes tensor rows; got {type(row).__name__}")
        values.append(row.values)
    return np.stack(values)


def onnx_dtype(type_name: str) -> type[np.generic]:
    """The numpy type of an ONNX Runtime input type name, e.g. "tensor(int64)"."""
    if type_name not in _ONNX_DTYPES:
        raise ValueError(f"ONNX input type {type_name} is not supported; expected one of {', '.join(_ONNX_DTYPES)}")
    return _ONNX_DTYPES[type_name]


def ngram_featurizer(config: dict[str, Any]) -> HashedNgramFeaturizer | NgramBlocks:
    """The hashed n-gram featurizer a manifest describes: one block, or several side by side."""
    return NgramBlocks.from_config(config) if "blocks" in config else HashedNgramFeaturizer.from_config(config)


def make_feeds(
    preprocess: str,
    graph_inputs: dict[str, str],
    *,
    featurizer: dict[str, Any] | None = None,
    tokenizer_path: Path | None = None,
    max_length: int = 0,
) -> Feeds:
    """The feeds of a graph with `graph_inputs` (name -> ONNX type name) under `preprocess`; ValueError saying
    what does not fit."""
    dtypes = {name: onnx_dtype(kind) for name, kind in graph_inputs.items()}
    names = sorted(dtypes)
    if preprocess in ("ngrams", "tokenizer"):
        floats = [f"{name!r} ({graph_inputs[name]})" for name in names if not np.issubdtype(dtypes[name], np.integer)]
        if floats:
            raise ValueError(f"a graph fed by {preprocess} takes integer ids; its input {', '.join(floats)} is not")
    if preprocess == "tensor":
        if len(names) != 1:
            raise ValueError(f"a tensor model's graph takes one input; this one takes {names}")
        (name,) = names
        return lambda rows: {name: stack(rows).astype(dtypes[name], copy=False)}
    if preprocess == "ngrams":
        if featurizer is None:
            raise ValueError("n-gram preprocessing needs the featurizer's configuration")
        if len(names) != 1:
            raise ValueError(f"a graph fed hashed n-grams takes one input of ids; this one takes {names}")
        (name,) = names
        ngrams = ngram_featurizer(featurizer)
        return lambda rows: {name: ngrams.transform(texts_of(rows)).astype(dtypes[name], copy=False)}
    if preprocess == "tokenizer":
        if tokenizer_path is None or max_length < 1:
            raise ValueError("tokenizer preprocessing needs a tokenizer file and a max_length of at least 1")
        if not {TOKEN_IDS, ATTENTION_MASK} <= set(names) <= {TOKEN_IDS, ATTENTION_MASK, TOKEN_TYPES, NGRAM_IDS}:
            raise ValueError(
                f"a graph fed by a tokenizer takes {TOKEN_IDS} and {ATTENTION_MASK} (and optionally {TOKEN_TYPES}, "
                f"or {NGRAM_IDS} with an n-gram featurizer); this one takes {names}"
            )
        if (NGRAM_IDS in names) != (featurizer is not None):
            raise ValueError(
                f"the graph {'takes' if NGRAM_IDS in names else 'takes no'} {NGRAM_IDS} but the manifest "
                f"{'gives no' if featurizer is None else 'gives an'} n-gram featurizer for it"
            )
        return TokenizerFeeds(Tokenizer.from_file(str(tokenizer_path)), max_length, dtypes, featurizer)
    raise ValueError(f"unknown preprocessing {preprocess!r}; expected ngrams, tokenizer or tensor")


class TokenizerFeeds:
    """Token ids and attention mask from a `tokenizers` tokenizer (padded to the longest row, truncated at
    `max_length`), token types of zeros where the graph takes them, and hashed n-gram ids where it has a lexical
    branch."""

    def __init__(
        self, tokenizer: Tokenizer, max_length: int, dtypes: dict[str, type[np.generic]], featurizer: Any
    ) -> None:
        self._tokenizer = tokenizer
        self._pad_id = prepare_tokenizer(tokenizer, max_length)
        self._dtypes = dtypes
        self._ngrams = None if featurizer is None else ngram_featurizer(featurizer)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 input_ids and attention_mask [n, longest in batch]."""
        return encode_batch(self._tokenizer, texts, self._pad_id)

    def __call__(self, rows: Sequence[Row]) -> dict[str, np.ndarray]:
        texts = texts_of(rows)
        ids, mask = self.encode(texts)
        feeds = {TOKEN_IDS: ids, ATTENTION_MASK: mask}
        if TOKEN_TYPES in self._dtypes:
            feeds[TOKEN_TYPES] = np.zeros_like(ids)
        if self._ngrams is not None:
            feeds[NGRAM_IDS] = self._ngrams.transform(texts)
        return {name: array.astype(self._dtypes[name], copy=False) for name, array in feeds.items()}
