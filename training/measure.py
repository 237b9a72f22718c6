"""Measuring runtime models (EdgeModel, CloudModel): batched logits, accuracy, call timings and percentiles."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tiergate.inputs import Row


class LogitsModel(Protocol):
    labels: list[str]

    def logits(self, texts: Sequence[Row]) -> np.ndarray: ...


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p99_ms: float
    rows_per_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, `q` in [0, 1]; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def share(mask: np.ndarray, digits: int | None = 4) -> float:
    """Fraction of true rows in `mask`, rounded to `digits` (None: not rounded); 0.0 for no rows."""
    value = float(np.mean(mask)) if len(mask) else 0.0
    return value if digits is None else round(value, digits)


def accuracy(predicted: np.ndarray, gold: np.ndarray, digits: int | None = 4) -> float:
    """Fraction of rows whose prediction is `gold`; `predicted` is logits [n, K] (argmax taken) or labels [n]."""
    labels = predicted.argmax(axis=1) if predicted.ndim == 2 else predicted
    return share(labels == gold, digits)


def batched_logits(model: LogitsModel, texts: Sequence[Row], batch_size: int = 256) -> np.ndarray:
    """float32 logits [n, K] of `texts` (or tensor rows), computed `batch_size` rows at a time."""
    chunks = [model.logits(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, len(model.labels)), dtype=np.float32)


def batched_components(model: Any, texts: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every named output of a CloudModel (``components``) over `texts`, `batch_size` rows at a time."""
    chunks = [model.components(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    if not chunks:
        return {name: np.zeros((0, len(model.labels)), dtype=np.float32) for name in model.outputs}
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def time_calls(predict: Callable[[Sequence[str]], Any], texts: Sequence[str], batch: int, calls: int) -> Timing:
    """Time `calls` predictions of `batch` rows each (after a warm-up), preprocessing included."""
    stream = itertools.cycle(texts)
    batches = [[next(stream) for _ in range(batch)] for _ in range(calls)]
    for warm in batches[: max(1, calls // 20)]:
        predict(warm)
    samples = []
    for rows in batches:
        started = time.perf_counter()
        predict(rows)
        samples.append((time.perf_counter() - started) * 1000.0)
    return Timing(percentile(samples, 0.5), percentile(samples, 0.99), batch * 1000.0 / statistics.mean(samples))


def batch1_latency_ms(model: LogitsModel, texts: Sequence[str], samples: int) -> dict[str, float]:
    """Batch-1 latency percentiles of `model.logits`, text preprocessing included, for reports and manifests."""
    timing = time_calls(model.logits, texts, 1, samples)
    return {"p50": round(timing.p50_ms, 4), "p99": round(timing.p99_ms, 4), "samples": samples}


@dataclass(frozen=True)
class VariantMeasurement:
    """One exported form of a model measured on labelled rows through its runtime."""

    validation_accuracy: float
    bytes: int
    batch1_latency_ms: dict[str, float]
    logits: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the manifest (without the logits)."""
        return {
            "validation_accuracy": self.validation_accuracy,
            "bytes": self.bytes,
            "batch1_latency_ms": self.batch1_latency_ms,
        }


def measure_variant(
    model: LogitsModel, path: Path, texts: Sequence[str], y: np.ndarray, samples: int
) -> VariantMeasurement:
    """Accuracy, file size and batch-1 latency of `model` (loaded from `path`) on `texts` labelled `y`."""
    logits = batched_logits(model, texts)
    return VariantMeasurement(
        validation_accuracy=accuracy(logits, y),
        bytes=path.stat().st_size,
        batch1_latency_ms=batch1_latency_ms(model, texts, samples),
        logits=logits,
    )


def bootstrap_ci(
    columns: dict[str, np.ndarray],
    ratios: dict[str, tuple[str, str]] | None = None,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals over rows: for each 0/1 (or numeric) column its mean's interval, and for
    each ratio (numerator column, denominator column) the interval of the ratio of their means, resampling the
    same rows for both. Seeded: the same rows give the same intervals."""
    lengths = {len(column) for column in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"bootstrap columns must have one length, got {sorted(lengths)}")
    (n,) = lengths
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    data = {name: np.asarray(column, dtype=np.float64) for name, column in columns.items()}
    means: dict[str, list[np.ndarray]] = {name: [] for name in data}
    for start in range(0, resamples, 200):  # 200 resamples at a time bound the index array's memory
        index = rng.integers(0, n, size=(min(200, resamples - start), n), dtype=np.int32)
        for name, column in data.items():
            means[name].append(column[index].mean(axis=1))
    drawn = {name: np.concatenate(chunks) for name, chunks in means.items()}
    tail = (1.0 - level) / 2.0 * 100.0
    intervals = {
        name: [round(float(np.percentile(values, tail)), 4), round(float(np.percentile(values, 100.0 - tail)), 4)]
        for name, values in drawn.items()
    }
    for name, (top, bottom) in (ratios or {}).items():
        ratio = drawn[top] / np.where(drawn[bottom] > 0, drawn[bottom], np.nan)
        intervals[name] = [
            round(float(np.nanpercentile(ratio, tail)), 4),
            round(float(np.nanpercentile(ratio, 100.0 - tail)), 4),
        ]
    return intervals
