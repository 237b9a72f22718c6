"""The drift watch: shadow samples compared with the cloud, the alarm on a shifted vocabulary, and its record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gateway.drift import FALLBACK_ALARM_AGREEMENT, AgreementWindow, Comparison, alarm_level, text_hash
from tests.conftest import Stack, StackFactory
from tests.test_gateway import infer_request
from tests.test_metrics import scrape, value
from tiergate.constants import MODEL_NAME
from tiergate.settings import DriftSettings
from training.data import generate_shifted_demo_texts
from training.tiny import TINY_LABELS

# Every confident edge answer is sampled, so a couple of hundred requests fill the window.
WINDOW = 100


def watching(record: Path | None = None, **overrides: object) -> DriftSettings:
    settings = DriftSettings(
        sample_rate=1.0,
        window=WINDOW,
        min_samples=60,
        alarm_agreement=0.8,
        batch_rows=16,
        record_path=record,
        record_agreeing=False,
    )
    for name, setting in overrides.items():
        setattr(settings, name, setting)
    return settings


async def replay(stack: Stack, texts: list[str], requests: int) -> None:
    """`requests` single-row requests cycling over `texts`, then wait until every sample was compared."""
    for i in range(requests):
        await stack.stub.ModelInfer(infer_request([texts[i % len(texts)]]), timeout=10.0)
    assert stack.gateway.drift is not None
    await stack.gateway.drift.drained()


def test_the_window_keeps_the_latest_comparisons_overall_and_per_label() -> None:
    window = AgreementWindow(4)
    assert window.agreement() == 1.0 and window.by_label() == {}
    for edge, cloud in [("milk", "milk"), ("milk", "tea"), ("tea", "tea"), ("tea", "tea"), ("milk", "milk")]:
        window.add(Comparison(edge, cloud, 0.9))
    # The first comparison has left the window: milk/tea, tea/tea, tea/tea, milk/milk.
    assert len(window) == 4 and window.agreement() == 0.75
    assert window.by_label() == {"milk": 0.5, "tea": 1.0}
    with pytest.raises(ValueError, match="at least one"):
        AgreementWindow(0)


async def test_in_distribution_traffic_raises_no_alarm(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    stack = await start_stack(drift=watching())
    with caplog.at_level(logging.WARNING, logger="gateway.drift"):
        await replay(stack, [text for text, _ in tiny_rows], 200)
    drift = stack.gateway.drift
    assert drift is not None and len(drift.window) >= 60
    assert drift.window.agreement() >= 0.9
    assert not drift.alarmed and not [r for r in caplog.records if r.name == "gateway.drift"]
    metrics = await scrape(stack.gateway.metrics_port)
    assert value(metrics, "tiergate_drift_alarm", model=MODEL_NAME) == 0
    assert value(metrics, "tiergate_drift_agreement", model=MODEL_NAME) == pytest.approx(drift.window.agreement())
    compared = value(metrics, "tiergate_drift_compared_rows_total", model=MODEL_NAME)
    assert compared == value(metrics, "tiergate_drift_sampled_rows_total", model=MODEL_NAME) > WINDOW
    assert len(drift.window) == WINDOW


async def test_a_shifted_vocabulary_fires_the_alarm_once_and_records_disagreements(
    start_stack: StackFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "feedback" / "drift.jsonl"
    stack = await start_stack(drift=watching(record))
    shifted = generate_shifted_demo_texts(300, seed=1, n_labels=TINY_LABELS)
    with caplog.at_level(logging.WARNING, logger="gateway.drift"):
        await replay(stack, shifted, 300)
    drift = stack.gateway.drift
    assert drift is not None and drift.alarmed
    assert drift.window.agreement() < 0.8
    warnings = [r for r in caplog.records if r.name == "gateway.drift" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per alarm, not one per batch"
    assert "drift: edge and cloud agree on" in warnings[0].getMessage()

    metrics = await scrape(stack.gateway.metrics_port)
    assert value(metrics, "tiergate_drift_alarm", model=MODEL_NAME) == 1
    per_label = [key for key in metrics if key[0] == "tiergate_drift_label_agreement"]
    assert per_label and all(dict(labels)["model"] == MODEL_NAME for _, labels in per_label)

    lines = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert lines and all(line["edge_label"] != line["cloud_label"] for line in lines)
    assert {"text_sha256", "edge_confidence", "model_version"} <= set(lines[0])
    assert all("text" not in line for line in lines), "text is kept only when the settings allow it"
    assert {line["text_sha256"] for line in lines} <= {text_hash(text) for text in shifted}


async def test_texts_are_recorded_only_when_allowed(start_stack: StackFactory, tmp_path: Path) -> None:
    record = tmp_path / "drift.jsonl"
    stack = await start_stack(drift=watching(record, record_text=True))
    shifted = generate_shifted_demo_texts(40, seed=2, n_labels=TINY_LABELS)
    await replay(stack, shifted, 40)
    lines = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert lines and all(line["text"] in shifted and text_hash(line["text"]) == line["text_sha256"] for line in lines)


async def test_a_full_queue_drops_samples_and_a_dead_cloud_loses_them_without_failing_requests(
    start_stack: StackFactory, tiny_rows: list[tuple[str, str]]
) -> None:
    stack = await start_stack(
        with_cloud=False, cloud_target="127.0.0.1:1", cloud_timeout_s=0.5, drift=watching(queue_size=2)
    )
    # One request of many rows: more samples than the queue holds arrive at once.
    reply = await stack.stub.ModelInfer(infer_request([text for text, _ in tiny_rows[:12]], tier="edge"), timeout=10.0)
    assert len(reply.outputs[0].contents.bytes_contents) == 12
    assert stack.gateway.drift is not None
    await stack.gateway.drift.drained()
    metrics = await scrape(stack.gateway.metrics_port)
    sampled = value(metrics, "tiergate_drift_sampled_rows_total", model=MODEL_NAME)
    dropped = value(metrics, "tiergate_drift_dropped_rows_total", model=MODEL_NAME)
    failed = value(metrics, "tiergate_drift_failed_rows_total", model=MODEL_NAME)
    assert sampled == 2 and dropped > 0, "the queue holds two; the other confident rows are dropped, not waited for"
    assert failed == sampled, "samples whose shadow call failed are counted, not compared"
    assert value(metrics, "tiergate_drift_compared_rows_total", model=MODEL_NAME) == 0


def test_bad_drift_settings_are_refused() -> None:
    from gateway.drift import DriftWatch
    from gateway.metrics import GatewayMetrics

    class Never:
        name = "cloud"

    with pytest.raises(ValueError, match="sample_rate must be within"):
        DriftWatch(DriftSettings(sample_rate=1.5), Never(), model="m", model_version="v", metrics=GatewayMetrics())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alarm level must be within"):
        alarm_level(DriftSettings(alarm_drop=0.5), expected_agreement=0.3)


def test_the_alarm_level_comes_from_settings_else_the_calibration() -> None:
    assert alarm_level(DriftSettings(alarm_agreement=0.7), expected_agreement=0.95) == 0.7
    assert alarm_level(DriftSettings(alarm_drop=0.05), expected_agreement=0.95) == pytest.approx(0.9)
    assert alarm_level(DriftSettings(), expected_agreement=None) == FALLBACK_ALARM_AGREEMENT


def test_the_build_records_the_agreement_the_alarm_is_measured_against(tiny_models: Path) -> None:
    from tiergate.manifest import load_manifest

    calibration = load_manifest(tiny_models, verify=False).routing.calibration
    assert 0.5 < calibration["confident_agreement"] <= 1.0
    assert 0 < calibration["confident_rows"] <= calibration["rows"]


def test_feedback_threshold_escalates_the_fewest_rows_that_reach_the_target() -> None:
    from training.calibrate import FeedbackRow, threshold_from_feedback

    rows = [FeedbackRow(c, a) for c, a in [(0.55, False), (0.6, True), (0.65, False), (0.8, True), (0.9, True)]]
    # Agreement now 3/5; escalating the three least confident rows makes it 5/5, two of them 4/5.
    threshold, details = threshold_from_feedback(0.5, rows, target_quality=1.0)
    assert 0.65 < threshold < 0.8 and details["live_agreement_after"] == 1.0
    assert details["live_agreement_before"] == 0.6 and details["added_escalation_of_confident_rows"] == 0.6
    threshold, details = threshold_from_feedback(0.5, rows, target_quality=0.8)
    assert 0.55 < threshold < 0.6 and details["live_agreement_after"] == 0.8
    # Never lower than today's threshold: feedback only ever sees rows above it.
    assert threshold_from_feedback(0.95, rows, target_quality=0.5)[0] == 0.95
    with pytest.raises(ValueError, match="only one kind of row"):
        threshold_from_feedback(0.5, [FeedbackRow(0.7, False)] * 3, target_quality=0.9)


async def test_calibrate_feedback_re_picks_the_threshold_on_recorded_live_traffic(
    start_stack: StackFactory, tiny_models: Path, tiny_rows: list[tuple[str, str]], tmp_path: Path
) -> None:
    import shutil

    from tiergate.manifest import load_manifest
    from training.calibrate import calibrate_from_feedback

    record = tmp_path / "drift.jsonl"
    stack = await start_stack(drift=watching(record, record_agreeing=True))
    shifted = generate_shifted_demo_texts(150, seed=3, n_labels=TINY_LABELS)
    await replay(stack, [text for text, _ in tiny_rows] + shifted, 230)
    lines = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    assert {line["agree"] for line in lines} == {True, False}

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    before = load_manifest(models).routing
    routing = calibrate_from_feedback(models, record, target_quality=0.95)
    assert routing.threshold > before.threshold
    assert routing.calibration["live_agreement_after"] >= 0.95 > routing.calibration["live_agreement_before"]
    assert routing.calibration["validation"] == before.calibration
    assert load_manifest(models).routing == routing, "the manifest (checksums unchanged) carries the new threshold"

    # A record of disagreements alone cannot re-pick anything, and says what to record instead.
    only = tmp_path / "disagreements.jsonl"
    only.write_text("".join(json.dumps(line) + "\n" for line in lines if not line["agree"]) * 10, encoding="utf-8")
    with pytest.raises(ValueError, match="record_agreeing"):
        calibrate_from_feedback(models, only, target_quality=0.95)
