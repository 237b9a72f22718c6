"""Unit tests for the hashed n-gram featurizer of the edge tier."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tiergate.features import HashedNgramFeaturizer


def test_shape_dtype_padding_and_range() -> None:
    featurizer = HashedNgramFeaturizer(n_buckets=2**10, max_features=32)
    ids = featurizer.transform(["Organic Whole Milk", "", "a"])
    assert ids.shape == (3, 32) and ids.dtype == np.int32
    assert (ids[1] == 0).all()
    nonzero = ids[ids != 0]
    assert nonzero.min() >= 1 and nonzero.max() <= 2**10 - 1
    assert (ids[0] != 0).sum() > 3


def test_normalisation_nfkc_and_case() -> None:
    featurizer = HashedNgramFeaturizer()
    a, b = featurizer.transform(["ＯＲＧＡＮＩＣ Milk", "organic milk"])
    np.testing.assert_array_equal(a, b)


def test_truncates_at_max_features_word_ngrams_first() -> None:
    featurizer = HashedNgramFeaturizer(max_features=4)
    long_name = "one two three four five six"
    ids = featurizer.transform([long_name])[0]
    assert (ids != 0).all()
    words_only = HashedNgramFeaturizer(max_features=4, char_ngrams=(0, 0)).transform([long_name])[0]
    np.testing.assert_array_equal(ids, words_only)


def test_config_round_trip() -> None:
    featurizer = HashedNgramFeaturizer(n_buckets=2**12, max_features=40, word_ngrams=(1, 1), char_ngrams=(2, 4))
    clone = HashedNgramFeaturizer.from_config(featurizer.config())
    texts = ["Chocolate Sandwich Cookies", "All-Seasons Salt"]
    np.testing.assert_array_equal(featurizer.transform(texts), clone.transform(texts))


def test_rejects_unknown_config_kind() -> None:
    with pytest.raises(ValueError, match="unsupported featurizer"):
        HashedNgramFeaturizer.from_config({"kind": "bpe"})


def test_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        HashedNgramFeaturizer().transform("milk")  # type: ignore[arg-type]


def test_ids_are_stable_across_processes() -> None:
    # Python's hash() is salted per process; crc32 ids must not be.
    code = (
        "from tiergate.features import HashedNgramFeaturizer as H;"
        "print(H().transform(['Greek Yogurt Vanilla'])[0].tolist())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PYTHONPATH": "."},
        ).stdout
        for seed in (1, 2)
    }
    here = HashedNgramFeaturizer().transform(["Greek Yogurt Vanilla"])[0].tolist()
    assert outputs == {f"{here}\n"}


def test_the_word_cache_changes_no_id_and_stays_bounded() -> None:
    # Speed is measured by `make bench` (batch-1 latency includes featurization); here only the
    # memo that makes it fast is checked: warm answers equal cold ones, and it never outgrows its limit.
    texts = [f"Organic Product {i} Vanilla Greek Yogurt 32 oz" for i in range(300)]
    cold = HashedNgramFeaturizer().transform(texts)
    warm = HashedNgramFeaturizer()
    warm._cache_limit = 50
    warm.transform(texts)
    np.testing.assert_array_equal(warm.transform(texts), cold)
    assert 0 < len(warm._word_cache) <= 50


def test_ngram_blocks_concatenate_and_round_trip() -> None:
    from tiergate.features import HashedNgramFeaturizer, NgramBlocks

    words = HashedNgramFeaturizer(n_buckets=512, max_features=8, word_ngrams=(1, 2), char_ngrams=(0, 0))
    chars = HashedNgramFeaturizer(n_buckets=512, max_features=16, word_ngrams=(1, 0), char_ngrams=(2, 3))
    blocks = NgramBlocks([words, chars])
    ids = blocks.transform(["Organic Milk", ""])
    assert ids.shape == (2, 24) and blocks.widths == [8, 16]
    np.testing.assert_array_equal(ids[:, :8], words.transform(["Organic Milk", ""]))
    np.testing.assert_array_equal(ids[:, 8:], chars.transform(["Organic Milk", ""]))
    assert (ids[0, :8] != 0).sum() == 3  # two words and one bigram, no character n-grams
    np.testing.assert_array_equal(NgramBlocks.from_config(blocks.config()).transform(["Organic Milk"]), ids[:1])
    small = HashedNgramFeaturizer(n_buckets=64, max_features=8)  # each block keeps its own bucket count
    mixed = NgramBlocks([words, small]).transform(["Organic Milk"])
    np.testing.assert_array_equal(mixed[:, 8:], small.transform(["Organic Milk"]))
    assert mixed[:, 8:].max() < 64 < mixed[:, :8].max()
    with pytest.raises(ValueError, match="unsupported n-gram blocks"):
        NgramBlocks.from_config(words.config())


def _reference_ids(featurizer: HashedNgramFeaturizer, text: str) -> list[int]:
    """The ids as defined, computed the slow way: each n-gram's bytes hashed whole (what built models learned)."""
    import re
    import unicodedata
    import zlib

    words = [w.encode() for w in re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())]
    modulus = featurizer.n_buckets - 1
    out = []
    for n in range(featurizer.word_ngrams[0], featurizer.word_ngrams[1] + 1):
        out += [zlib.crc32(b" ".join(words[i : i + n]), 0x5EED0001) % modulus + 1 for i in range(len(words) - n + 1)]
    lo, hi = featurizer.char_ngrams
    if hi > 0:
        for word in words:
            marked = b"<" + word + b">"
            out += [
                zlib.crc32(marked[i : i + n], 0x5EED0002) % modulus + 1
                for n in range(lo, min(hi, len(marked)) + 1)
                for i in range(len(marked) - n + 1)
            ]
    return out[: featurizer.max_features]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"n_buckets": 2**17, "max_features": 128},
        {"word_ngrams": (1, 3)},
        {"word_ngrams": (2, 3), "char_ngrams": (0, 0)},
    ],
)
def test_ids_match_hashing_each_ngram_whole(config: dict[str, object]) -> None:
    # Word n-grams are hashed by continuing each word's crc32 over " next": the same ids as hashing "w1 w2".
    featurizer = HashedNgramFeaturizer(**config)  # type: ignore[arg-type]
    texts = ["Organic Whole Milk 1 gal", "Ｆｕｌｌｗｉｄｔｈ Café Crème", "a", "", "東京 ラーメン 123", "x " * 80]
    for _ in range(2):  # cold, then from the word cache
        for text in texts:
            assert featurizer.features(text) == _reference_ids(featurizer, text), text


def test_word_ngram_sizes_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        HashedNgramFeaturizer(word_ngrams=(0, 2))
    assert HashedNgramFeaturizer(word_ngrams=(1, 0)).features("organic milk")[:1] != []  # words off, chars on
