"""Unit tests for temperature scaling and the confidence signals."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate.scoring import SIGNALS, Scored, score, softmax


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    sharp, flat = softmax(logits, 1.0), softmax(logits, 4.0)
    np.testing.assert_allclose(sharp.sum(axis=1), 1.0, rtol=1e-6)
    assert flat[0].max() < sharp[0].max()


def test_softmax_is_stable_for_large_logits() -> None:
    probs = softmax(np.array([[1000.0, 0.0]]), 1.0)
    assert np.isfinite(probs).all() and probs[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_softmax_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 2)), temperature)


def test_signals_match_their_definitions() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    assert score(logits, 1.0, "max_prob").signal[0] == pytest.approx(0.7, abs=1e-6)
    assert score(logits, 1.0, "margin").signal[0] == pytest.approx(0.5, abs=1e-6)
    p = np.array([0.7, 0.2, 0.1])
    expected = 1.0 - (-(p * np.log(p)).sum()) / np.log(3)
    assert score(logits, 1.0, "entropy").signal[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("signal", SIGNALS)
def test_score_types_and_ranges(signal: str) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    scored = score(logits, 1.5, signal)
    assert isinstance(scored, Scored)
    assert scored.label_index.dtype == np.int64 and scored.signal.dtype == np.float32
    np.testing.assert_array_equal(scored.label_index, logits.argmax(axis=1))
    assert ((scored.signal >= 0.0) & (scored.signal <= 1.0)).all()


@pytest.mark.parametrize("signal", SIGNALS)
def test_uniform_is_least_and_one_hot_most_confident(signal: str) -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]])
    conf = score(logits, 1.0, signal).signal
    assert conf[0] < conf[1]
    assert conf[1] == pytest.approx(1.0, abs=1e-5)


def test_unknown_signal_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown confidence signal 'vibes'"):
        score(np.zeros((1, 3)), 1.0, "vibes")


@pytest.mark.parametrize("signal", SIGNALS)
def test_probability_is_the_temperature_scaled_softmax_of_the_returned_label(signal: str) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 5)) * 3.0
    scored = score(logits, 2.0, signal)
    z = np.exp(logits / 2.0 - (logits / 2.0).max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scored.probability, probs.max(axis=1), rtol=1e-5)
    assert ((scored.probability > 1.0 / 5 - 1e-6) & (scored.probability <= 1.0)).all()
    if signal == "max_prob":
        np.testing.assert_allclose(scored.probability, scored.signal, rtol=1e-5)
    else:  # a margin or entropy signal is not the probability a caller is shown
        assert np.abs(scored.probability - scored.signal).max() > 0.05
