"""Query spelling correction: what it corrects, what it leaves, its file, and both tiers reading through it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from tiergate.manifest import SPELLING_FORMAT, ManifestError, load_manifest, manifest_from_dict, manifest_to_dict
from tiergate.spelling import Vocabulary, within_one_edit
from training import augment

CATALOGUE = [
    "Organic Whole Milk 1 gal",
    "Whole Wheat Tortillas",
    "Corn Tortillas",
    "Whole Wheat Bread",
    "Sparkling Mineral Water Lime",
    "Sparkling Water Grapefruit",
    "Chocolate Chip Cookies",
    "Chocolate Almond Milk",
    "Tortilla Chips",
    "Mild Salsa",
    "Mild Salsa Verde",
    "Lime Sherbet",
]


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.from_texts(CATALOGUE)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("tortilals", "tortillas"),  # two neighbours swapped
        ("tortllas", "tortillas"),  # a letter dropped
        ("tortilllas", "tortillas"),  # a letter doubled
        ("tortiklas", "tortillas"),  # a neighbouring key
    ],
)
def test_one_slip_from_a_catalogue_word_is_corrected(vocabulary: Vocabulary, typed: str, meant: str) -> None:
    assert vocabulary.correct_word(typed.lower()) == meant


def test_only_the_corrected_words_change(vocabulary: Vocabulary) -> None:
    assert vocabulary.correct("Whole Wheat Trtillas, 12 ct") == "Whole Wheat tortillas, 12 ct"
    assert vocabulary.correct("CHOCOLAYE Chip") == "chocolate Chip", "a slip in any case is found"
    assert vocabulary.correct("Sparkling Water Lime") == "Sparkling Water Lime", "known words are left alone"


def test_what_is_left_alone(vocabulary: Vocabulary) -> None:
    assert vocabulary.correct_word("lie") == "lie", "short words are one edit from too many others"
    assert vocabulary.correct_word("12oz") == "12oz", "sizes and codes are not words"
    assert vocabulary.correct_word("kombucha") == "kombucha", "nothing within one edit: unchanged"
    # "tortilla" appears once here: a word seen once is not offered as a correction.
    assert Vocabulary.from_texts(["Tortilla Chips"]).correct_word("tortila") == "tortila"
    assert vocabulary.correct("cafe\u0301 Chocolaye") == "cafe\u0301 chocolate", "a word with combining marks as typed"


def test_a_word_longer_than_any_in_the_vocabulary_costs_nothing(vocabulary: Vocabulary) -> None:
    """Rows may be kilobytes of one word: nothing is within one edit of it, so it is neither searched nor cached."""
    long_word = "tortillas" * 200
    assert vocabulary.correct_word(long_word) == long_word
    assert vocabulary.correct_word("chocolates") == "chocolate", "one letter longer than the longest is still searched"
    assert long_word not in vocabulary._corrected


def test_the_most_frequent_candidate_wins_and_ties_do_not_depend_on_order() -> None:
    texts = ["salsa verde"] * 3 + ["salsa roja"] * 3 + ["sala mix"] * 2 + ["sals mix"] * 2
    vocabulary = Vocabulary.from_texts(texts)
    assert vocabulary.correct_word("salss") == "salsa", "salsa (6) beats sals (2), both one edit away"
    # bread and broad tie, one edit from "bryad" each: the later word wins whichever order the counts come in.
    assert Vocabulary({"bread": 3, "broad": 3}).correct_word("bryad") == "broad"
    assert Vocabulary({"broad": 3, "bread": 3}).correct_word("bryad") == "broad"


def test_within_one_edit() -> None:
    assert within_one_edit("milk", "mlik") and within_one_edit("milk", "milks") and within_one_edit("milk", "mik")
    assert within_one_edit("milk", "silk") and within_one_edit("milk", "milk")
    assert not within_one_edit("milk", "mkli") and not within_one_edit("milk", "mi") and not within_one_edit("a", "abc")
    assert within_one_edit("milk", "mikl") and within_one_edit("", "a") and within_one_edit("", "")
    assert not within_one_edit("", "ab") and not within_one_edit("milk", "kilm")


def test_file_round_trip_is_byte_stable(tmp_path: Path, vocabulary: Vocabulary) -> None:
    first = vocabulary.save(tmp_path / "a.json")
    again = Vocabulary.from_texts(list(reversed(CATALOGUE))).save(tmp_path / "b.json")
    assert first.read_bytes() == again.read_bytes(), "the same rows, in any order, give the same file"
    loaded = Vocabulary.load(first)
    assert loaded.counts == vocabulary.counts and loaded.correct("Mild Saalsa") == "Mild salsa"
    (tmp_path / "bad.json").write_text(json.dumps({"format": 9, "counts": {}}))
    with pytest.raises(ValueError, match=r"bad\.json is unreadable"):
        Vocabulary.load(tmp_path / "bad.json")


def test_misspelled_catalogue_rows_mostly_come_back() -> None:
    """The eval's typo family on the catalogue itself: what correction recovers, and that it never breaks a row."""
    vocabulary = Vocabulary.from_texts(CATALOGUE * 2)  # every word seen twice: each may be offered
    rng = random.Random(3)
    restored = 0
    trials = 0
    for text in CATALOGUE * 20:
        typed = augment.typo(text, rng)
        if typed == text:
            continue
        trials += 1
        fixed = vocabulary.correct(typed)
        restored += fixed.lower() == text.lower()
        assert vocabulary.correct(text) == text
    assert trials > 100 and restored / trials > 0.8, f"{restored} of {trials} rows restored"


def test_built_models_ship_a_vocabulary_both_tiers_read_through(tiny_models: Path, tiny_rows: list) -> None:
    manifest = load_manifest(tiny_models)
    assert manifest.spelling is not None and (tiny_models / manifest.spelling.path).is_file()
    vocabulary = Vocabulary.load(tiny_models / manifest.spelling.path)
    # A held-out row with a slip in a word the catalogue knows: each tier answers it as it answers the clean row.
    rng = random.Random(0)
    clean, typed = [], []
    for text, _ in tiny_rows:
        slipped = augment.typo(text, rng)
        if slipped != text and vocabulary.correct(slipped).lower() == vocabulary.correct(text).lower():
            clean.append(text)
            typed.append(slipped)
    assert len(typed) >= 10
    edge, cloud = EdgeModel.load(tiny_models), CloudModel.load(tiny_models)
    try:
        for model in (edge, cloud):
            np.testing.assert_allclose(model.logits(typed), model.logits(clean), rtol=1e-5, atol=1e-5)
            model.spelling = None  # the same model without its vocabulary reads the slips as they came
            assert not np.allclose(model.logits(typed), model.logits(clean), atol=1e-5)
    finally:
        edge.close()
        cloud.close()


def test_the_manifest_names_the_vocabulary_for_text_models_only(tiny_models: Path) -> None:
    raw = manifest_to_dict(load_manifest(tiny_models))
    assert raw["spelling"]["path"] == "spelling.json"
    assert raw["format_version"] == SPELLING_FORMAT, "a reader that would ignore the vocabulary refuses the set"
    assert manifest_from_dict({**raw, "spelling": None}).spelling is None, "no vocabulary: no correction"
    tensor_input = [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    with pytest.raises(ManifestError, match="spelling correction is for text inputs"):
        manifest_from_dict({**raw, "inputs": tensor_input, "edge": {**raw["edge"], "featurizer": None}})


def test_a_changed_vocabulary_is_caught_by_both_tiers(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    vocabulary = copy / "spelling.json"
    vocabulary.write_text(vocabulary.read_text(encoding="utf-8").replace('"min_count":2', '"min_count":1'))
    for load in (EdgeModel.load, CloudModel.load):
        with pytest.raises(ManifestError, match="corrupt"):
            load(copy)
