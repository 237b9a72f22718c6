"""Unit tests for temperature fitting, AUROC, signal choice and threshold calibration."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate.scoring import softmax
from training.calibrate import (
    ESCALATE_ALL,
    auroc,
    cascade_curve,
    fit_temperature,
    routing_from_predictions,
    signal_aurocs,
    threshold_for_escalation,
    threshold_for_quality,
)
from training.data import grouped_split, normalise_name


def test_auroc_known_values() -> None:
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=3.0, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(true_logits, 1.0)])
    # The model is overconfident by a factor 2.5: the fitted temperature should undo it.
    assert fit_temperature(true_logits * 2.5, y) == pytest.approx(2.5, rel=0.1)


def test_signal_aurocs_cover_all_signals() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 4)) * 2
    logits[:100] *= 0.2  # flat rows, where the labels are then scrambled
    y = logits.argmax(1).copy()
    y[:100] = (y[:100] + 1) % 4
    aurocs = signal_aurocs(logits, 1.0, y)
    assert set(aurocs) == {"max_prob", "margin", "entropy"} and all(0.5 < a <= 1.0 for a in aurocs.values())


@pytest.mark.parametrize("target", [0.0, 0.05, 0.15, 0.5, 1.0])
def test_threshold_for_escalation_hits_target(target: float) -> None:
    conf = np.random.default_rng(2).random(1000).astype(np.float32)
    threshold = threshold_for_escalation(conf, target)
    assert abs(float((conf < threshold).mean()) - target) <= 0.002


def test_threshold_for_escalation_handles_ties_and_extremes() -> None:
    conf = np.array([0.2] * 50 + [0.9] * 50, dtype=np.float32)
    assert (conf < threshold_for_escalation(conf, 0.4)).mean() == 0.5
    assert threshold_for_escalation(np.ones(10, dtype=np.float32), 1.0) == ESCALATE_ALL
    with pytest.raises(ValueError):
        threshold_for_escalation(conf, 1.5)


def test_threshold_for_quality_is_the_least_escalation_meeting_the_floor() -> None:
    conf = np.linspace(0.0, 1.0, 100)
    edge_right = conf > 0.3  # the edge is wrong exactly on the 30 least confident rows
    cloud_right = np.ones(100, dtype=bool)
    threshold = threshold_for_quality(conf, edge_right, cloud_right, 0.99)
    escalated = conf < threshold
    assert escalated.mean() == pytest.approx(0.29)
    assert np.where(escalated, cloud_right, edge_right).mean() >= 0.99


def test_unreachable_quality_escalates_everything() -> None:
    conf = np.linspace(0, 1, 10)
    cloud_right = np.arange(10) % 2 == 0
    assert threshold_for_quality(conf, np.zeros(10, bool), cloud_right, 1.5) == ESCALATE_ALL


def test_cascade_curve_ends_at_edge_and_cloud_accuracy() -> None:
    rng = np.random.default_rng(3)
    conf, edge_right, cloud_right = rng.random(200), rng.random(200) < 0.7, rng.random(200) < 0.9
    curve = cascade_curve(conf, edge_right, cloud_right)
    assert curve.escalation[0] == 0.0 and curve.escalation[-1] == 1.0
    assert curve.accuracy[0] == pytest.approx(edge_right.mean())
    assert curve.accuracy[-1] == pytest.approx(cloud_right.mean())


def test_routing_needs_exactly_one_target() -> None:
    conf = np.random.default_rng(4).random(50)
    right = np.ones(50, dtype=bool)
    with pytest.raises(ValueError, match="exactly one"):
        routing_from_predictions("margin", conf, right, right)
    with pytest.raises(ValueError, match="exactly one"):
        routing_from_predictions("margin", conf, right, right, target_escalation=0.1, target_quality=0.99)
    spec = routing_from_predictions("margin", conf, right, right, target_escalation=0.2)
    assert spec.signal == "margin" and spec.calibration["achieved_escalation"] == pytest.approx(0.2)


def test_grouped_split_keeps_near_duplicates_together_and_is_deterministic() -> None:
    texts = [f"Product {i % 300}" + ("!" if i % 2 else "") for i in range(900)] + ["PRODUCT 7", "product-7"]
    a, b = grouped_split(texts, seed=5), grouped_split(texts, seed=5)
    parts = zip((a.train, a.validation, a.test), (b.train, b.validation, b.test), strict=True)
    assert all(np.array_equal(x, y) for x, y in parts)
    where = {}
    for part, index in (("train", a.train), ("validation", a.validation), ("test", a.test)):
        for i in index:
            assert where.setdefault(normalise_name(texts[i]), part) == part
    assert sum(a.sizes().values()) == len(texts)
    assert grouped_split(texts, seed=6).test.tolist() != a.test.tolist()


def test_the_lower_bound_aim_escalates_more_than_the_point_estimate_and_holds_the_floor_on_resamples() -> None:
    from training.calibrate import threshold_for_quality, threshold_for_quality_lower_bound

    rng = np.random.default_rng(4)
    n = 3000
    confidence = rng.random(n)
    # The edge is right more often the surer it is; the cloud is right 85% of the time.
    edge_right = rng.random(n) < 0.45 + 0.5 * confidence
    cloud_right = rng.random(n) < 0.85
    point = threshold_for_quality(confidence, edge_right, cloud_right, 0.99)
    lower = threshold_for_quality_lower_bound(confidence, edge_right, cloud_right, 0.99, seed=1)
    assert lower > point, "aiming at the lower bound escalates more rows"
    assert lower == threshold_for_quality_lower_bound(confidence, edge_right, cloud_right, 0.99, seed=1)
    escalate = confidence < lower
    cascade = np.where(escalate, cloud_right, edge_right)
    ratios = []
    for _ in range(300):  # fresh resamples: the floor holds on nearly all of them
        pick = rng.integers(0, n, n)
        ratios.append(cascade[pick].mean() / cloud_right[pick].mean())
    assert np.quantile(ratios, 0.05) >= 0.99 - 0.003


def test_edge_candidates_within_the_noise_margin_are_chosen_by_accuracy_then_size() -> None:
    from dataclasses import replace
    from pathlib import Path

    from training.build import SELECTION_MARGIN, EdgeCandidate, QuantizedForms, choose_candidate
    from training.config import EdgeConfig
    from training.measure import VariantMeasurement

    def candidate(name: str, escalation: float, accuracy: float, buckets: int, dim: int) -> EdgeCandidate:
        measured = VariantMeasurement(accuracy, 1, {"p50": 0.1}, np.zeros((1, 2)))
        forms = QuantizedForms(Path("f"), Path("q"), Path("c"), Path("t"))
        return EdgeCandidate(
            config=EdgeConfig(name=name, n_buckets=buckets, dim=dim),
            training={},
            train_seconds=0.0,
            forms=forms,
            variants={"int8": measured},
            served_variant="int8",
            temperature=1.0,
            featurizer={},
            escalation_at_quality_floor=escalation,
            best_signal_at_floor="max_prob",
            within_bounds=True,
        )

    a = candidate("a", 0.1271, 0.752, 2**18, 64)  # least escalation, by less than the margin
    b = candidate("b", 0.1333, 0.756, 2**17, 128)  # better accuracy
    assert choose_candidate([a, b]) is b
    far = replace(b, escalation_at_quality_floor=0.1271 + SELECTION_MARGIN + 0.005)
    assert choose_candidate([a, far]) is a, "beyond the margin the escalation decides"
    small = candidate("small", 0.13, 0.752, 2**16, 64)
    assert choose_candidate([a, small]) is small, "equal accuracy: the smaller"


def test_the_served_int8_form_is_the_most_accurate_within_the_edge_bounds() -> None:
    from training.build import served_form
    from training.measure import VariantMeasurement

    def form(accuracy: float, p50_ms: float) -> VariantMeasurement:
        return VariantMeasurement(accuracy, 16 * 2**20, {"p50": p50_ms}, np.zeros((1, 2)))

    variants = {
        "dynamic_per_channel": form(0.769, 0.11),
        "dynamic_per_tensor": form(0.768, 0.10),
        "qdq": form(0.772, 7.0),
    }
    assert served_form(variants) == "dynamic_per_channel", "QDQ is more accurate but too slow for the edge"
    assert served_form({**variants, "qdq": form(0.772, 0.2)}) == "qdq"
    assert served_form({**variants, "dynamic_per_tensor": form(0.769, 0.09)}) == "dynamic_per_channel", "ties: first"
    slow = {name: form(m.validation_accuracy, 9.0) for name, m in variants.items()}
    assert served_form(slow) == "qdq", "none fits: the most accurate"


def test_the_interval_aim_holds_the_floor_at_the_lower_end_of_a_fresh_splits_reported_interval() -> None:
    """Aiming at the true ratio often leaves a fresh split's reported interval under the floor; aiming at the
    interval clears the floor by that split's noise too."""
    from training.calibrate import threshold_for_quality_lower_bound

    rng = np.random.default_rng(7)
    n = 3000

    def draw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows like a cascade's: the cloud fixes some edge errors, most of them on unsure rows, and misses a few
        rows the edge gets right."""
        confidence = rng.random(n)
        edge_right = rng.random(n) < 0.5 + 0.5 * confidence
        fixed = ~edge_right & (rng.random(n) < 0.4 * (1 - confidence) ** 2)
        missed = edge_right & (rng.random(n) < 0.02)
        return confidence, edge_right, (edge_right | fixed) & ~missed

    confidence, edge_right, cloud_right = draw()
    ratio = threshold_for_quality_lower_bound(confidence, edge_right, cloud_right, 0.99, seed=1)
    interval = threshold_for_quality_lower_bound(confidence, edge_right, cloud_right, 0.99, seed=1, aim="interval")
    assert interval > ratio, "clearing a fresh split's noise too escalates more rows"

    def reported_lower_end(threshold: float) -> float:
        """The 95% interval's lower end that an evaluation of a fresh split reports for this threshold."""
        fresh_confidence, fresh_edge, fresh_cloud = draw()
        cascade = np.where(fresh_confidence < threshold, fresh_cloud, fresh_edge)
        picks = rng.integers(0, n, (200, n))
        return float(np.quantile(cascade[picks].mean(axis=1) / fresh_cloud[picks].mean(axis=1), 0.025))

    held = {
        name: np.mean([reported_lower_end(t) >= 0.99 for _ in range(40)])
        for name, t in (("ratio", ratio), ("interval", interval))
    }
    assert held["interval"] >= 0.85, held
    assert held["ratio"] < held["interval"], held
    with pytest.raises(ValueError, match="unknown lower-bound aim"):
        threshold_for_quality_lower_bound(confidence, edge_right, cloud_right, 0.99, aim="median")
