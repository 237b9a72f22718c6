"""Measuring runtime models (EdgeModel, CloudModel): batched logits, call timings and percentiles."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class LogitsModel(Protocol):
    labels: list[str]

    def logits(self, texts: Sequence[str]) -> np.ndarray: ...


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
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def batched_logits(model: LogitsModel, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """float32 logits [n, K] of `texts`, computed `batch_size` rows at a time."""
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
