"""Temperature scaling, escalation-signal choice and threshold calibration on the validation split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiergate.constants import MODEL_NAME
from tiergate.manifest import RoutingSpec, load_manifest, with_routing, write_manifest
from tiergate.scoring import SIGNALS, confidence_from_probs, score, softmax
from training.measure import batched_logits, share

logger = logging.getLogger(__name__)

# A confidence never exceeds 1, so a threshold above it escalates every row.
ESCALATE_ALL = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
# What a quality floor calibrated at a lower bound aims at (threshold_for_quality_lower_bound), as the manifest says it.
LOWER_BOUND_AIMS = {
    "ratio": "one-sided 95% lower bound",
    "interval": "one-sided 95% lower bound less the 95% interval's half-width (the floor at the lower end of the "
    "interval a fresh split of this size reports)",
}


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under ``softmax(logits / T)``."""
    probs = softmax(logits, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL (log-spaced grid, then golden-section refinement)."""
    if len(y) == 0:
        return 1.0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    losses = [nll(logits, y, float(t)) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = np.log(grid[max(0, best - 1)]), np.log(grid[min(len(grid) - 1, best + 1)])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(30):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits, y, float(np.exp(a))) < nll(logits, y, float(np.exp(b))):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2.0))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` rows (ties get average rank)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # Average ranks over tied groups.
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def signal_aurocs(logits: np.ndarray, temperature: float, y: np.ndarray) -> dict[str, float]:
    """AUROC of each confidence signal for "the edge prediction is right"."""
    probs = softmax(logits, temperature)
    right = probs.argmax(axis=1) == y
    return {s: round(auroc(confidence_from_probs(probs, s), right), 4) for s in SIGNALS}


def _cut(sorted_conf: np.ndarray, k: int) -> float:
    """Threshold that escalates exactly the ``k`` lowest confidences (midpoint between neighbours)."""
    n = len(sorted_conf)
    if k <= 0:
        return 0.0
    if k >= n:
        return ESCALATE_ALL
    return float((float(sorted_conf[k - 1]) + float(sorted_conf[k])) / 2.0)


def threshold_for_escalation(confidence: np.ndarray, target: float) -> float:
    """Threshold whose escalation rate (confidence < threshold) on these rows is closest to ``target``."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target escalation must be within [0, 1], got {target}")
    conf = np.sort(np.asarray(confidence, dtype=np.float64))
    n = len(conf)
    if n == 0:
        return 0.0
    k = round(target * n)
    # Tied confidences cannot be split, so use the nearest cut between distinct values.
    cuts = np.concatenate([[0, n], np.flatnonzero(np.diff(conf) > 0) + 1])
    return _cut(conf, int(cuts[np.argmin(np.abs(cuts - k))]))


@dataclass(frozen=True)
class Curve:
    """Cascade accuracy against escalation rate, one point per distinct cut of the confidence."""

    escalation: np.ndarray
    accuracy: np.ndarray
    thresholds: np.ndarray


def cascade_curve(confidence: np.ndarray, edge_right: np.ndarray, cloud_right: np.ndarray) -> Curve:
    """Accuracy of "escalate the k least confident rows" for every k at a tie boundary."""
    order = np.argsort(confidence, kind="mergesort")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    edge = np.asarray(edge_right, dtype=np.float64)[order]
    cloud = np.asarray(cloud_right, dtype=np.float64)[order]
    n = len(conf)
    gain = np.concatenate([[0.0], np.cumsum(cloud - edge)])
    ks = np.concatenate([[0], np.flatnonzero(np.diff(conf) > 0) + 1, [n]]) if n else np.array([0])
    ks = np.unique(ks)
    accuracy = (edge.sum() + gain[ks]) / max(n, 1)
    return Curve(
        escalation=ks / max(n, 1),
        accuracy=accuracy,
        thresholds=np.array([_cut(conf, int(k)) for k in ks]),
    )


def threshold_for_quality(
    confidence: np.ndarray, edge_right: np.ndarray, cloud_right: np.ndarray, target: float
) -> float:
    """Lowest-escalation threshold whose cascade accuracy reaches ``target`` x cloud-only accuracy."""
    if not 0.0 < target <= 1.5:
        raise ValueError(f"target quality must be a ratio to cloud accuracy in (0, 1.5], got {target}")
    curve = cascade_curve(confidence, edge_right, cloud_right)
    floor = target * float(np.mean(cloud_right)) if len(cloud_right) else 0.0
    meets = np.flatnonzero(curve.accuracy >= floor - 1e-12)
    if len(meets) == 0:
        logger.warning("quality floor %.4f is not reachable on these rows; escalating everything", floor)
        return ESCALATE_ALL
    return float(curve.thresholds[meets[0]])


def threshold_for_quality_lower_bound(
    confidence: np.ndarray,
    edge_right: np.ndarray,
    cloud_right: np.ndarray,
    target: float,
    *,
    resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
    aim: str = "ratio",
) -> float:
    """Lowest-escalation threshold whose cascade/cloud accuracy ratio reaches ``target`` at a lower bound over
    bootstrap resamples of these rows, not only at its point estimate.

    ``aim`` says which bound. ``"ratio"``: the ratio's one-sided ``level`` lower bound, so the true ratio on rows
    like these holds the floor with that confidence. ``"interval"``: that bound less the half-width of the
    two-sided ``level`` interval, so an evaluation on a fresh split of this size, which reports such an interval,
    shows the floor at the interval's lower end with that confidence (the ratio must clear the floor by this
    split's noise and by the fresh split's)."""
    if aim not in LOWER_BOUND_AIMS:
        raise ValueError(f"unknown lower-bound aim {aim!r}; expected one of {', '.join(LOWER_BOUND_AIMS)}")
    if not 0.0 < target <= 1.5:
        raise ValueError(f"target quality must be a ratio to cloud accuracy in (0, 1.5], got {target}")
    n = len(confidence)
    if n == 0:
        return ESCALATE_ALL
    order = np.argsort(np.asarray(confidence, dtype=np.float64), kind="mergesort")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    edge = np.asarray(edge_right, dtype=np.float64)[order]
    cloud = np.asarray(cloud_right, dtype=np.float64)[order]
    # Each resample as how many times it draws each row (rows in confidence order).
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    base, cloud_total = weights @ edge, weights @ cloud
    gains = np.concatenate([np.zeros((resamples, 1)), np.cumsum(weights * (cloud - edge), axis=1)], axis=1)
    ks = np.unique(np.concatenate([[0], np.flatnonzero(np.diff(conf) > 0) + 1, [n]]))
    ratios = (base[:, None] + gains[:, ks]) / np.where(cloud_total > 0, cloud_total, np.nan)[:, None]
    lower = np.nanquantile(ratios, 1.0 - level, axis=0)
    if aim == "interval":
        point = (edge.sum() + np.concatenate([[0.0], np.cumsum(cloud - edge)])[ks]) / max(cloud.sum(), 1e-12)
        lower = lower - (point - np.nanquantile(ratios, (1.0 - level) / 2.0, axis=0))
    meets = np.flatnonzero(lower >= target - 1e-12)
    if len(meets) == 0:
        logger.warning("quality floor %.4f is not reachable at its lower bound on these rows; escalating all", target)
        return ESCALATE_ALL
    return _cut(conf, int(ks[meets[0]]))


def routing_from_predictions(
    signal: str,
    confidence: np.ndarray,
    edge_right: np.ndarray,
    cloud_right: np.ndarray,
    target_escalation: float | None = None,
    target_quality: float | None = None,
    extra: dict[str, Any] | None = None,
    agreement: np.ndarray | None = None,
    lower_bound: bool = False,
    lower_bound_aim: str = "ratio",
) -> RoutingSpec:
    """Pick the threshold for one target on validation predictions and describe what it achieved.

    `agreement` (per row: edge and cloud predict the same label) adds the share of the rows the edge
    keeps on which the cloud agrees: the baseline the gateway's drift watch compares live traffic with.
    """
    if (target_escalation is None) == (target_quality is None):
        raise ValueError("give exactly one of target_escalation or target_quality")
    if target_escalation is not None:
        threshold = threshold_for_escalation(confidence, target_escalation)
        target = {"kind": "escalation", "value": float(target_escalation)}
    else:
        assert target_quality is not None
        point = threshold_for_quality(confidence, edge_right, cloud_right, target_quality)
        target = {"kind": "quality", "value": float(target_quality)}
        threshold = point
        if lower_bound:
            threshold = threshold_for_quality_lower_bound(
                confidence, edge_right, cloud_right, target_quality, aim=lower_bound_aim
            )
            target["aim"] = LOWER_BOUND_AIMS[lower_bound_aim] + ", 200 bootstrap resamples of the validation rows"
            target["point_estimate_threshold"] = round(float(point), 6)
            target["point_estimate_escalation"] = round(float(np.mean(np.asarray(confidence) < point)), 4)
    escalate = np.asarray(confidence) < threshold
    n = max(len(escalate), 1)
    cascade = np.where(escalate, cloud_right, edge_right)
    cloud_acc = share(cloud_right, digits=None)
    calibration: dict[str, Any] = {
        "target": target,
        "split": "validation",
        "rows": len(escalate),
        "achieved_escalation": round(float(escalate.sum()) / n, 4),
        "cascade_accuracy": share(cascade),
        "edge_accuracy": share(edge_right),
        "cloud_accuracy": round(cloud_acc, 4),
        "quality_ratio": round(float(np.mean(cascade)) / cloud_acc, 4) if cloud_acc else None,
    }
    if agreement is not None:
        kept = ~escalate
        calibration["confident_rows"] = int(kept.sum())
        calibration["confident_agreement"] = share(np.asarray(agreement)[kept]) if kept.any() else None
    if extra:
        calibration.update(extra)
    return RoutingSpec(signal=signal, threshold=float(threshold), calibration=calibration)


def least_escalation_at_floor(
    edge_logits: np.ndarray, temperature: float, y: np.ndarray, cloud_right: np.ndarray, quality: float
) -> tuple[float, str]:
    """Least escalation (over the signals) keeping the cascade at ``quality`` x cloud on these rows, and its signal."""
    best = (2.0, "max_prob")
    for signal in SIGNALS:
        scored = score(edge_logits, temperature, signal)
        spec = routing_from_predictions(
            signal, scored.signal, scored.label_index == y, cloud_right, target_quality=quality
        )
        best = min(best, (spec.calibration["achieved_escalation"], signal))
    return best


def calibrate(
    model_dir: Path,
    data_dir: Path | None,
    target_escalation: float | None = None,
    target_quality: float | None = None,
) -> RoutingSpec:
    """Re-derive the validation split, run both tiers through the serving runtime, pick and store the threshold."""
    from cloud_runtime.model import CloudModel
    from edge_runtime.model import EdgeModel
    from training.data import load_split_for_manifest

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    catalogue, split = load_split_for_manifest(manifest, data_dir)
    val = catalogue.subset(split.validation)
    edge = EdgeModel.load(model_dir, manifest)
    cloud = CloudModel.load(model_dir, manifest)
    try:
        edge_scored = edge.predict(val.texts)
        cloud_labels = batched_logits(cloud, val.texts).argmax(1)
    finally:
        edge.close()
        cloud.close()
    routing = routing_from_predictions(
        manifest.routing.signal,
        edge_scored.signal,
        edge_scored.label_index == val.y,
        cloud_labels == val.y,
        target_escalation=target_escalation,
        target_quality=target_quality,
        agreement=edge_scored.label_index == cloud_labels,
        extra={
            key: manifest.routing.calibration[key] for key in ("signal_auroc",) if key in manifest.routing.calibration
        },
    )
    write_manifest(model_dir, with_routing(manifest, routing))
    logger.info(
        "calibrated %s: signal %s threshold %.4f escalation %.3f on %d validation rows",
        model_dir,
        routing.signal,
        routing.threshold,
        routing.calibration["achieved_escalation"],
        len(val),
    )
    return routing


@dataclass(frozen=True)
class FeedbackRow:
    """One drift-watch record: a confident edge answer and whether the cloud agreed with it."""

    confidence: float
    agree: bool


def read_feedback(path: Path, model: str, version: str) -> list[FeedbackRow]:
    """The records of `path` for this model and version (others are skipped: they came from other models)."""
    rows: list[FeedbackRow] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record.get("model") != model or record.get("model_version") != version:
                    continue
                agree = record.get("agree", record["edge_label"] == record["cloud_label"])
                rows.append(FeedbackRow(float(record["edge_confidence"]), bool(agree)))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a drift-watch record ({error})") from None
    return rows


def threshold_from_feedback(
    threshold: float, rows: list[FeedbackRow], target_quality: float
) -> tuple[float, dict[str, Any]]:
    """The least threshold (no lower than `threshold`) at which the cascade agrees with the cloud on at least
    `target_quality` of the live confident rows: rows under it would be escalated, so they agree by definition."""
    if not 0.0 < target_quality <= 1.0:
        raise ValueError(f"--target-quality must be within (0, 1], got {target_quality}")
    if not any(row.agree for row in rows) or all(row.agree for row in rows):
        raise ValueError(
            "the feedback holds only one kind of row; re-picking a threshold needs the rows the cloud agreed with "
            "and the ones it did not: record both (gateway drift.record_agreeing = true)"
        )
    confidence = np.array([row.confidence for row in rows])
    agree = np.array([row.agree for row in rows])
    order = np.argsort(confidence, kind="mergesort")
    confidence, agree = confidence[order], agree[order]
    n = len(rows)
    # Escalating the k least confident rows: agreement = (k + agreeing rows among the rest) / n.
    kept_agreeing = np.concatenate([np.cumsum(agree[::-1])[::-1], [0]])
    achieved = (np.arange(n + 1) + kept_agreeing) / n
    k = int(np.argmax(achieved >= target_quality - 1e-12))
    new = max(threshold, _cut(confidence, k))
    escalated = float(np.mean(confidence < new))
    return new, {
        "target": {"kind": "live_quality", "value": float(target_quality)},
        "split": "feedback",
        "rows": n,
        "previous_threshold": float(threshold),
        "live_agreement_before": round(float(np.mean(agree)), 4),
        "live_agreement_after": round(float(achieved[k]), 4),
        "added_escalation_of_confident_rows": round(escalated, 4),
    }


def calibrate_from_feedback(model_dir: Path, feedback: Path, target_quality: float, min_rows: int = 50) -> RoutingSpec:
    """Raise the threshold until the cascade agrees with the cloud on `target_quality` of the live confident rows
    the drift watch recorded, and store it (with what the calibration on validation said) in the manifest."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir, verify=False)
    rows = read_feedback(feedback, MODEL_NAME, manifest.version)
    if len(rows) < min_rows:
        raise ValueError(
            f"{feedback} holds {len(rows)} records for model version {manifest.version}; at least {min_rows} are needed"
        )
    threshold, details = threshold_from_feedback(manifest.routing.threshold, rows, target_quality)
    previous = manifest.routing.calibration
    validation = previous.get("validation", previous)
    # The drift alarm keeps measuring against the agreement seen on validation.
    calibration = {**details, "validation": validation, "confident_agreement": validation.get("confident_agreement")}
    routing = RoutingSpec(signal=manifest.routing.signal, threshold=float(threshold), calibration=calibration)
    write_manifest(model_dir, with_routing(manifest, routing))
    return routing
