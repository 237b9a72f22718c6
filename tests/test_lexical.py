"""The cloud's lexical branch: TF-IDF features, SVM fitting with out-of-fold margins, the ONNX graph, the fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the train extra (torch) is needed to build models")

from cloud_runtime.model import CloudModel
from training.cloud_train import (
    FusedCloudNet,
    Fusion,
    TinyCloudNet,
    export_cloud_onnx,
    fit_fusion,
    fuse,
    save_tokenizer,
    train_wordlevel_tokenizer,
)
from training.lexical import (
    fit_idf,
    fold_of,
    lexical_featurizer,
    tfidf_rows,
    train_lexical,
)

TEXTS = [
    "Organic Whole Milk",
    "Low Fat Milk",
    "Chocolate Milk",
    "Greek Yogurt Plain",
    "Strawberry Yogurt",
    "Vanilla Yogurt",
    "Sourdough Bread",
    "Whole Wheat Bread",
    "Rye Bread",
    "Bananas",
    "Organic Bananas",
    "Red Apples",
]
Y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def test_idf_weights_rare_buckets_higher_and_ignores_padding() -> None:
    ids = np.array([[5, 6, 0], [5, 7, 0], [5, 5, 8]], dtype=np.int32)
    idf = fit_idf(ids, 16)
    assert idf[0] == 0.0
    assert idf[6] == idf[7] == idf[8] > idf[5]  # 5 is in every row, counted once per row
    assert idf[9] > idf[6]  # never seen: the largest weight


def test_tfidf_blocks_are_unit_length_each_and_sum_repeats() -> None:
    ids = np.array([[1, 0, 3, 3, 4, 0], [0, 0, 0, 0, 0, 0]], dtype=np.int32)
    idf = np.arange(8, dtype=np.float32)
    x = tfidf_rows(ids, idf, [2, 4]).toarray()
    assert x[0, 1] == pytest.approx(1.0)  # the word block: one feature, unit length on its own
    np.testing.assert_allclose(x[0, [3, 4]], np.array([6.0, 4.0]) / np.sqrt(9 + 9 + 16))
    assert x[1].sum() == 0.0  # an empty row stays zero instead of dividing by zero
    with pytest.raises(ValueError, match="do not add up"):
        tfidf_rows(ids, idf, [2, 2])


def test_folds_keep_near_duplicates_together_and_are_stable() -> None:
    folds = fold_of(["Whole Milk", "whole  milk!", "Rye Bread"], 4)
    assert folds[0] == folds[1]
    assert list(folds) == list(fold_of(["Whole Milk", "whole  milk!", "Rye Bread"], 4))


def test_train_lexical_learns_and_gives_out_of_fold_margins() -> None:
    model, oof = train_lexical(TEXTS * 3, np.tile(Y, 3), 5, 2**12, 64, c=1.0, folds=3)
    ids = model.featurize(TEXTS)
    assert ids.shape == (len(TEXTS), sum(model.widths)) and model.widths == [48, 64]
    np.testing.assert_array_equal(ids, lexical_featurizer(2**12, 64).transform(TEXTS))
    margins = model.margins(ids)
    assert margins.shape == (len(TEXTS), 5) and oof.shape == (3 * len(TEXTS), 5)
    assert (margins.argmax(1) == Y).all()
    assert (margins[:, 4] < -1).all()  # label 4 never occurs: it can never win
    assert [b["n_buckets"] for b in model.featurizer["blocks"]] == [2**12, 2**12]


def test_two_classes_get_one_margin_each() -> None:
    model, _ = train_lexical(TEXTS[:6] * 2, np.tile(Y[:6], 2), 2, 2**10, 48, c=1.0, folds=2)
    margins = model.margins(model.featurize(TEXTS[:6]))
    np.testing.assert_allclose(margins[:, 0], -margins[:, 1], atol=1e-6)
    assert (margins.argmax(1) == Y[:6]).all()


def test_fusion_leans_on_the_part_that_is_right() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    good = np.eye(4)[y] * 3 + rng.normal(0, 0.5, (400, 4))
    noise = rng.normal(0, 1.0, (400, 4))
    assert fit_fusion(good, noise, y).alpha >= 0.8
    assert fit_fusion(noise, good, y).alpha <= 0.2
    fusion = Fusion(alpha=0.5, gamma=3.0)
    fused = fuse(good, noise, fusion)
    assert (np.exp(fused).sum(axis=1) <= 1.0 + 1e-5).all()  # a geometric mixture of distributions


def test_onnx_graph_matches_the_python_branch(tmp_path: Path) -> None:
    """The served graph computes exactly the lexical margins and the fusion the build fitted."""
    import torch

    model, _ = train_lexical(TEXTS * 2, np.tile(Y, 2), 4, 2**12, 64, c=1.0, folds=2)
    tokenizer = train_wordlevel_tokenizer(TEXTS, 64)
    torch.manual_seed(0)
    deep = TinyCloudNet(tokenizer.get_vocab_size(), 8, 4)
    fusion = Fusion(alpha=0.7, gamma=5.0)
    onnx_path = export_cloud_onnx(FusedCloudNet(deep, model, fusion), tmp_path / "cloud.onnx")
    tok_path = save_tokenizer(tokenizer, tmp_path / "tokenizer.json", 16)
    cloud = CloudModel.from_files(onnx_path, tok_path, ["a", "b", "c", "d"], 16, featurizer_config=model.featurizer)
    try:
        parts = cloud.components(TEXTS)
    finally:
        cloud.close()
    expected = model.margins(model.featurize(TEXTS))
    np.testing.assert_allclose(parts["lexical_logits"], expected, atol=1e-4)
    np.testing.assert_allclose(parts["logits"], fuse(parts["deep_logits"], parts["lexical_logits"], fusion), atol=1e-4)


def test_graph_and_manifest_must_agree_on_the_featurizer(tmp_path: Path) -> None:
    model, _ = train_lexical(TEXTS, Y, 4, 2**10, 32, c=1.0, folds=2)
    tokenizer = train_wordlevel_tokenizer(TEXTS, 64)
    deep = TinyCloudNet(tokenizer.get_vocab_size(), 8, 4)
    fused = export_cloud_onnx(FusedCloudNet(deep, model, Fusion()), tmp_path / "fused.onnx")
    plain = export_cloud_onnx(deep, tmp_path / "plain.onnx")
    tok_path = save_tokenizer(tokenizer, tmp_path / "tokenizer.json", 16)
    with pytest.raises(ValueError, match="takes ngram_ids but the manifest gives no n-gram featurizer"):
        CloudModel.from_files(fused, tok_path, list("abcd"), 16)
    with pytest.raises(ValueError, match="takes no ngram_ids but the manifest gives an n-gram featurizer"):
        CloudModel.from_files(plain, tok_path, list("abcd"), 16, featurizer_config=model.featurizer)
    plain_model = CloudModel.from_files(plain, tok_path, list("abcd"), 16)
    try:
        assert set(plain_model.components(TEXTS[:2])) == {"logits"}
    finally:
        plain_model.close()


def test_large_batches_run_in_chunks_with_the_same_answers(tmp_path: Path) -> None:
    from cloud_runtime import model as cloud_model

    model, _ = train_lexical(TEXTS, Y, 4, 2**10, 32, c=1.0, folds=2)
    tokenizer = train_wordlevel_tokenizer(TEXTS, 64)
    deep = TinyCloudNet(tokenizer.get_vocab_size(), 8, 4)
    path = export_cloud_onnx(FusedCloudNet(deep, model, Fusion(alpha=0.5, gamma=2.0)), tmp_path / "fused.onnx")
    cloud = CloudModel.from_files(
        path, save_tokenizer(tokenizer, tmp_path / "t.json", 16), list("abcd"), 16, featurizer_config=model.featurizer
    )
    try:
        texts = TEXTS * ((cloud_model.MAX_ROWS_PER_RUN * 2) // len(TEXTS) + 1)  # three chunks, the last partial
        batched = cloud.logits(texts)
        assert batched.shape == (len(texts), 4)
        np.testing.assert_allclose(batched[: len(TEXTS)], cloud.logits(TEXTS), atol=1e-5)
        np.testing.assert_allclose(batched[-len(TEXTS) :], cloud.logits(TEXTS), atol=1e-5)
    finally:
        cloud.close()
