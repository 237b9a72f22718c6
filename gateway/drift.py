"""Drift watch: shadow-sample rows the edge answered confidently to the cloud, and watch how often they agree.

Off the request path: sampled rows wait in a bounded queue (dropped, and counted, when it is full)
and a background task sends them to the reference tier in small batches. Agreement is kept over a
sliding window of the latest comparisons, overall and per edge label. When it falls below the alarm
level the watch logs one warning and raises a gauge. Disagreeing rows (and, unless told not to, agreeing ones)
are appended to a JSON-lines file that `tiergate calibrate --feedback` reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.metrics import GatewayMetrics
from gateway.tier import Tier
from tiergate.errors import TierDeadlineError, TierUnavailableError
from tiergate.inputs import Row, Vector
from tiergate.settings import DriftSettings
from tiergate.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One row the edge answered, waiting for the reference tier's opinion."""

    text: Row
    edge_label: str
    confidence: float


@dataclass(frozen=True)
class Comparison:
    edge_label: str
    cloud_label: str
    confidence: float

    @property
    def agree(self) -> bool:
        return self.edge_label == self.cloud_label


def text_hash(text: Row) -> str:
    """The key a feedback record carries instead of the row: sha256 of a text's UTF-8 bytes, or of a tensor
    row's datatype, shape and bytes."""
    return hashlib.sha256(text.key if isinstance(text, Vector) else text.encode("utf-8")).hexdigest()


class AgreementWindow:
    """Edge/cloud agreement over the latest `size` comparisons, overall and per edge label."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the drift window must hold at least one comparison")
        self._window: deque[Comparison] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._window)

    def add(self, comparison: Comparison) -> None:
        self._window.append(comparison)

    def agreement(self) -> float:
        """Share of comparisons in the window where edge and cloud agree (1.0 when empty)."""
        if not self._window:
            return 1.0
        return sum(c.agree for c in self._window) / len(self._window)

    def by_label(self) -> dict[str, float]:
        """Agreement per edge label, over the comparisons of that label in the window."""
        seen: Counter[str] = Counter()
        agreed: Counter[str] = Counter()
        for c in self._window:
            seen[c.edge_label] += 1
            agreed[c.edge_label] += c.agree
        return {label: agreed[label] / count for label, count in seen.items()}


# The alarm level when neither the settings nor the manifest give one (a manifest calibrated before the
# build recorded its validation agreement).
FALLBACK_ALARM_AGREEMENT = 0.8


def alarm_level(settings: DriftSettings, expected_agreement: float | None) -> float:
    """The settings' absolute level, else the calibrated agreement less `alarm_drop`, else the fallback."""
    if settings.alarm_agreement is not None:
        level = settings.alarm_agreement
    elif expected_agreement is not None:
        level = expected_agreement - settings.alarm_drop
    else:
        level = FALLBACK_ALARM_AGREEMENT
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"the drift alarm level must be within [0, 1], got {level}")
    return level


# The alarm clears only this far above its level, so agreement hovering at the level warns once, not often.
CLEAR_MARGIN = 0.02


class DriftWatch:
    """Samples confident edge answers, compares them with the reference tier, and raises an alarm on drift."""

    def __init__(
        self,
        settings: DriftSettings,
        reference: Tier,
        *,
        model: str,
        model_version: str,
        metrics: GatewayMetrics,
        expected_agreement: float | None = None,
        seed: int | None = None,
    ) -> None:
        """`expected_agreement`: what the calibration measured on validation (the manifest's), if known."""
        if not 0.0 <= settings.sample_rate <= 1.0:
            raise ValueError(f"drift sample_rate must be within [0, 1], got {settings.sample_rate}")
        self.alarm_level = alarm_level(settings, expected_agreement)
        self.settings = settings
        self.reference = reference
        self.model = model
        self.model_version = model_version
        self.window = AgreementWindow(settings.window)
        self.alarmed = False
        self._metrics = metrics
        self._random = random.Random(seed)
        self._queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize=max(1, settings.queue_size))
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._record = settings.record_path
        metrics.drift_agreement.labels(model=model).set(1.0)
        metrics.drift_alarm.labels(model=model).set(0)
        metrics.drift_alarm_level.labels(model=model).set(self.alarm_level)

    @property
    def enabled(self) -> bool:
        return self.settings.sample_rate > 0.0

    def offer(self, texts: Sequence[Row | None], answers: Sequence[tuple[str, float, bool]]) -> None:
        """Consider one answered request: per row the text that may leave the private side (None: it may not)
        and (label, confidence, confident); never blocks.

        Only confident first-tier answers are sampled: the rows the last tier never saw. A row's text is read
        only once it is sampled (reading it may run the boundary policy).
        """
        if not self.enabled:
            return
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts for {len(answers)} answers")
        for index, (label, confidence, confident) in enumerate(answers):
            if not confident or self._random.random() >= self.settings.sample_rate:
                continue
            text = texts[index]
            if text is None:
                continue
            try:
                self._queue.put_nowait(Sample(text, label, confidence))
            except asyncio.QueueFull:
                self._metrics.drift_dropped.labels(model=self.model).inc()
            else:
                self._idle.clear()
                self._metrics.drift_sampled.labels(model=self.model).inc()

    def start(self) -> None:
        """Start the background comparer (on the running loop); a no-op when sampling is off."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="drift-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def drained(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until every queued sample has been compared or given up on."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.settings.batch_rows and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._compare(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The watch must never take the gateway down; what failed is in the log.
                logger.exception("drift watch failed on a batch of %d rows", len(batch))
            finally:
                if self._queue.empty():
                    self._idle.set()

    async def _compare(self, batch: list[Sample]) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.timeout_s
        try:
            answers = await self.reference.predict([s.text for s in batch], deadline)
        except (TierUnavailableError, TierDeadlineError) as error:
            self._metrics.drift_failed.labels(model=self.model).inc(len(batch))
            logger.debug("drift watch: reference tier failed (%s); %d samples dropped", error, len(batch))
            return
        comparisons = [
            Comparison(sample.edge_label, answer.label, sample.confidence)
            for sample, answer in zip(batch, answers, strict=True)
        ]
        for comparison in comparisons:
            self.window.add(comparison)
        self._metrics.drift_compared.labels(model=self.model).inc(len(comparisons))
        self._update_gauges()
        recorded = [
            (s, c) for s, c in zip(batch, comparisons, strict=True) if self.settings.record_agreeing or not c.agree
        ]
        if recorded and self._record is not None:
            await asyncio.to_thread(self._append, recorded)

    def _update_gauges(self) -> None:
        agreement = self.window.agreement()
        self._metrics.drift_agreement.labels(model=self.model).set(agreement)
        for label, share in self.window.by_label().items():
            self._metrics.drift_label_agreement.labels(model=self.model, label=label).set(share)
        ready = len(self.window) >= self.settings.min_samples
        if ready and agreement < self.alarm_level and not self.alarmed:
            self.alarmed = True
            self._metrics.drift_alarm.labels(model=self.model).set(1)
            logger.warning(
                "drift: edge and cloud agree on %.1f%% of the last %d sampled rows (alarm below %.1f%%); "
                "the edge model may need recalibrating or retraining",
                agreement * 100,
                len(self.window),
                self.alarm_level * 100,
            )
        elif self.alarmed and agreement >= self.alarm_level + CLEAR_MARGIN:
            self.alarmed = False
            self._metrics.drift_alarm.labels(model=self.model).set(0)
            logger.info("drift: agreement back at %.1f%%", agreement * 100)

    def _append(self, rows: list[tuple[Sample, Comparison]]) -> None:
        assert self._record is not None
        now = time.time()
        lines = []
        for sample, comparison in rows:
            record: dict[str, Any] = {
                "time": round(now, 3),
                "model": self.model,
                "model_version": self.model_version,
                "text_sha256": text_hash(sample.text),
                "edge_label": comparison.edge_label,
                "cloud_label": comparison.cloud_label,
                "edge_confidence": round(comparison.confidence, 6),
                "agree": comparison.agree,
            }
            if self.settings.record_text:
                text = sample.text
                record["text"] = text.values.tolist() if isinstance(text, Vector) else text
            lines.append(json.dumps(record, ensure_ascii=False))
        path = Path(self._record)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
