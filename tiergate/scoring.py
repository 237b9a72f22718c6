"""Temperature-scaled probabilities and the confidence signals that drive escalation.

Two numbers per row, never to be confused: the calibrated probability of the returned label (what a caller reads
as `confidence`), and the routing signal (max_prob, margin or entropy, as the manifest names it) that a tier's
threshold applies to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIGNALS = ("max_prob", "margin", "entropy")


@dataclass(frozen=True)
class Scored:
    """Predicted label indices; per row the calibrated probability of that label and the routing signal, both in
    [0, 1] (higher means more confident)."""

    label_index: np.ndarray
    probability: np.ndarray
    signal: np.ndarray


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 for stable small probabilities."""
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D [n, K], got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    probs: np.ndarray = z
    return probs


def confidence_from_probs(probs: np.ndarray, signal: str) -> np.ndarray:
    """One confidence value per row of ``probs`` for the named signal."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown confidence signal {signal!r}; expected one of {', '.join(SIGNALS)}")
    n, k = probs.shape
    if signal == "max_prob":
        conf = probs.max(axis=1)
    elif signal == "margin":
        if k < 2:
            conf = np.ones(n)
        else:
            top2 = np.partition(probs, k - 2, axis=1)[:, k - 2 :]
            conf = top2[:, 1] - top2[:, 0]
    elif k < 2:
        conf = np.ones(n)
    else:
        safe = np.clip(probs, 1e-12, 1.0)
        entropy = -(probs * np.log(safe)).sum(axis=1)
        conf = 1.0 - entropy / np.log(k)
    clipped: np.ndarray = np.clip(conf, 0.0, 1.0).astype(np.float32)
    return clipped


def score(logits: np.ndarray, temperature: float, signal: str) -> Scored:
    """Arg-max labels, their temperature-scaled probabilities, and the chosen routing signal of ``logits``."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown confidence signal {signal!r}; expected one of {', '.join(SIGNALS)}")
    probs = softmax(logits, temperature)
    label_index = probs.argmax(axis=1).astype(np.int64)
    return Scored(
        label_index=label_index,
        probability=probs[np.arange(len(probs)), label_index].astype(np.float32),
        signal=confidence_from_probs(probs, signal),
    )


def as_logits(raw: np.ndarray, scores: str, labels: int) -> np.ndarray:
    """float32 logits [n, labels] from what a graph answers (`scores`): logits as they are, probabilities as their
    logarithms, one probability (a binary model's positive label, the last label) as [log(1 - p), log(p)].
    ValueError when the shape does not fit."""
    array = np.asarray(raw, dtype=np.float32)
    if scores == "probability":
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1 or labels != 2:
            raise ValueError(f"a one-probability output is [n] or [n, 1] for two labels; got shape {list(raw.shape)}")
        p = np.clip(array.astype(np.float64), 1e-7, 1.0 - 1e-7)
        logits: np.ndarray = np.stack([np.log1p(-p), np.log(p)], axis=1).astype(np.float32)
        return logits
    if array.ndim != 2 or array.shape[1] != labels:
        raise ValueError(f"the model answers shape {list(array.shape)}; expected [n, {labels}] for its {labels} labels")
    if scores == "probabilities":
        logs: np.ndarray = np.log(np.clip(array, 1e-7, None)).astype(np.float32)
        return logs
    if scores != "logits":
        raise ValueError(f"unknown scores {scores!r}; expected logits, probabilities or probability")
    return array
