"""Shared measuring helpers: batched inference equals one big call, percentiles, timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.model import EdgeModel
from training.measure import batch1_latency_ms, batched_logits, percentile


def test_batched_logits_match_one_call_across_batch_edges(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> None:
    # FP32: the dynamic INT8 form scales activations per call, so its logits depend on the batch's rows.
    model = EdgeModel.load(tiny_models, variant="fp32")
    texts = [text for text, _ in tiny_rows[:10]]
    try:
        whole = model.logits(texts)
        np.testing.assert_allclose(batched_logits(model, texts, batch_size=3), whole, rtol=1e-6, atol=1e-6)
        assert batched_logits(model, [], batch_size=3).shape == (0, len(model.labels))
        timing = batch1_latency_ms(model, texts, samples=20)
    finally:
        model.close()
    assert 0 < timing["p50"] <= timing["p99"] and timing["samples"] == 20


@pytest.mark.parametrize(("q", "expected"), [(0.0, 1.0), (0.5, 3.0), (0.99, 5.0), (1.0, 5.0)])
def test_percentile_nearest_rank(q: float, expected: float) -> None:
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert np.isnan(percentile([], 0.5))
