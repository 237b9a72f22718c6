"""The cloud model's lexical branch: hashed TF-IDF over word and character n-grams, fitted by a linear SVM.

Fine-tuned MiniLM reads word pieces and misses much of what brand and product tokens carry; a linear
model over character n-grams catches it. The branch is trained here with scikit-learn and then served
inside the cloud's one ONNX graph (``cloud_train.FusedCloudNet``), so its features must be computable in
ONNX. A row is two blocks of hashed ids (word 1-2 grams, then character 2-5 grams; repeats kept,
0 = padding). Within each block the feature vector is ``sum over positions of idf[id] * onehot(id)``
divided by ``sqrt(sum over the block's positions of idf[id]**2)``, so each block has unit length, as in
a union of two TF-IDF vectorizers. ``tfidf_rows`` builds exactly that matrix; the graph computes exactly
that sum.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from tiergate.features import HashedNgramFeaturizer, NgramBlocks
from training.data import normalise_name
from training.measure import accuracy

logger = logging.getLogger(__name__)

# A class absent from one fold's training rows gets this margin in that fold's predictions.
ABSENT_CLASS_MARGIN = -5.0


@dataclass(frozen=True)
class LexicalModel:
    """A linear classifier over hashed TF-IDF features: ``margins = tfidf(ids) @ coef + intercept``."""

    featurizer: dict[str, Any]  # NgramBlocks.config()
    idf: np.ndarray  # float32 [n_buckets]; idf[0] = 0 so padding adds nothing
    coef: np.ndarray  # float32 [n_buckets, K]
    intercept: np.ndarray  # float32 [K]

    @property
    def widths(self) -> list[int]:
        """Width of each id block, in order."""
        return [int(block["max_features"]) for block in self.featurizer["blocks"]]

    def featurize(self, texts: Sequence[str]) -> np.ndarray:
        """int32 ids [n, sum of widths] of ``texts``, as the served graph receives them."""
        return NgramBlocks.from_config(self.featurizer).transform(texts)

    def margins(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, K] decision values for featurized rows."""
        scores = tfidf_rows(ids, self.idf, self.widths) @ self.coef
        return np.asarray(scores, dtype=np.float32) + self.intercept


def lexical_featurizer(n_buckets: int, max_features: int, word_features: int = 48) -> NgramBlocks:
    """A word 1-2 gram block and a character 2-5 gram block (the reference TF-IDF + SVM's n-gram ranges);
    ``max_features`` is the character block's width."""
    # An empty range turns a kind of n-gram off: (0, 0) no character n-grams, (1, 0) no word n-grams.
    return NgramBlocks(
        [
            HashedNgramFeaturizer(
                n_buckets=n_buckets, max_features=word_features, word_ngrams=(1, 2), char_ngrams=(0, 0)
            ),
            HashedNgramFeaturizer(
                n_buckets=n_buckets, max_features=max_features, word_ngrams=(1, 0), char_ngrams=(2, 5)
            ),
        ]
    )


def fit_idf(ids: np.ndarray, n_buckets: int) -> np.ndarray:
    """Smoothed inverse document frequency per bucket (scikit-learn's formula); bucket 0 (padding) gets 0."""
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    counts = sparse.csr_matrix((np.ones(ids.size, dtype=np.float32), (rows, ids.ravel())), shape=(len(ids), n_buckets))
    df = np.asarray((counts > 0).sum(axis=0)).ravel()  # a row counts once per bucket
    idf = np.log((1.0 + len(ids)) / (1.0 + df)) + 1.0
    idf[0] = 0.0
    return idf.astype(np.float32)


def block_slices(widths: Sequence[int]) -> list[slice]:
    """Column slice of each block in a row of concatenated ids."""
    ends = np.cumsum(widths)
    return [slice(int(end - width), int(end)) for end, width in zip(ends, widths, strict=True)]


def tfidf_rows(ids: np.ndarray, idf: np.ndarray, widths: Sequence[int]) -> sparse.csr_matrix:
    """The block-wise L2-normalised TF-IDF matrix of featurized rows, as the graph computes it (module doc)."""
    if sum(widths) != ids.shape[1]:
        raise ValueError(f"block widths {list(widths)} do not add up to the id width {ids.shape[1]}")
    weights = idf[ids].astype(np.float64)
    for part in block_slices(widths):
        norms = np.sqrt((weights[:, part] ** 2).sum(axis=1, keepdims=True))
        weights[:, part] /= np.maximum(norms, 1e-12)
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    return sparse.csr_matrix((weights.ravel(), (rows, ids.ravel())), shape=(len(ids), len(idf)))


def _fit_svm(x: sparse.csr_matrix, y: np.ndarray, n_labels: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest LinearSVC; returns coef [d, K] and intercept [K] over all ``n_labels`` classes."""
    from sklearn.svm import LinearSVC

    classes = np.unique(y)
    coef = np.zeros((x.shape[1], n_labels), dtype=np.float32)
    intercept = np.full(n_labels, ABSENT_CLASS_MARGIN, dtype=np.float32)
    if len(classes) == 1:
        intercept[classes[0]] = -ABSENT_CLASS_MARGIN
        return coef, intercept
    svm = LinearSVC(C=c, random_state=0).fit(x, y)
    if len(classes) == 2:  # scikit-learn keeps one hyperplane for two classes
        coef[:, classes[1]], coef[:, classes[0]] = svm.coef_[0], -svm.coef_[0]
        intercept[classes[1]], intercept[classes[0]] = svm.intercept_[0], -svm.intercept_[0]
    else:
        coef[:, svm.classes_] = svm.coef_.T
        intercept[svm.classes_] = svm.intercept_
    return coef, intercept


def fold_of(texts: Sequence[str], folds: int) -> np.ndarray:
    """Fold per row, keyed by the normalised name so near-duplicates share a fold (stable across runs)."""
    return np.array([zlib.crc32(normalise_name(t).encode("utf-8")) % folds for t in texts], dtype=np.int64)


def train_lexical(
    texts: Sequence[str], y: np.ndarray, n_labels: int, n_buckets: int, max_features: int, c: float, folds: int
) -> tuple[LexicalModel, np.ndarray]:
    """Fit the branch on all rows, plus out-of-fold margins for those rows.

    The out-of-fold margins stand in for the branch's output on the training rows wherever a later step
    must not see a model that has memorised them (the edge's distillation teacher).
    """
    featurizer = lexical_featurizer(n_buckets, max_features)
    ids = featurizer.transform(texts)
    idf = fit_idf(ids, n_buckets)
    x = tfidf_rows(ids, idf, featurizer.widths)
    fold = fold_of(texts, folds)
    oof = np.zeros((len(texts), n_labels), dtype=np.float32)
    for k in range(folds):
        held = fold == k
        if held.any() and (~held).any():
            coef, intercept = _fit_svm(x[~held], y[~held], n_labels, c)
            oof[held] = np.asarray(x[held] @ coef, dtype=np.float32) + intercept
    coef, intercept = _fit_svm(x, y, n_labels, c)
    model = LexicalModel(featurizer=featurizer.config(), idf=idf, coef=coef, intercept=intercept)
    logger.info(
        "lexical branch: %d buckets, %d rows, out-of-fold accuracy %.4f",
        n_buckets,
        len(texts),
        accuracy(oof, y, digits=None),
    )
    return model, oof
