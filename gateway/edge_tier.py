"""The edge tier: the INT8 edge model run in-process; the one gateway module that touches the edge runtime."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from edge_runtime.model import EdgeModel
from gateway.metrics import GatewayMetrics
from gateway.tier import Prediction
from tiergate.batching import DynamicBatcher
from tiergate.inputs import Row
from tiergate.manifest import Manifest
from tiergate.settings import BatchingSettings


class EdgeTier:
    """Runs the INT8 edge model in-process: small calls on the event loop, larger ones on a worker thread."""

    def __init__(
        self,
        model: EdgeModel,
        name: str = "edge",
        *,
        tracer: trace.Tracer | None = None,
        metrics: GatewayMetrics | None = None,
        batching: BatchingSettings | None = None,
        inline_rows: int = 0,
    ) -> None:
        """`batching` None or disabled: one model call per request. Calls of at most `inline_rows` rows run on
        the event loop (the hand-off to the worker thread and back costs more than a small model call), unless
        the worker is busy; larger ones on the worker, so the loop serves other requests meanwhile."""
        if inline_rows < 0:
            raise ValueError(f"edge_inline_rows must be 0 or more, got {inline_rows}")
        self.name = name
        self._inline_rows = inline_rows
        # Calls on the worker not yet finished: while there are any, small calls queue behind them there, so the
        # model never runs on two threads at once.
        self._on_worker = 0
        self._model = model
        self._tracer = tracer or trace.NoOpTracer()
        self._batch_rows = (metrics or GatewayMetrics()).edge_batch_rows.labels(tier=name)
        # One worker: the ONNX session is used by one thread at a time, and requests queue in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge")
        self._closed = False
        # With batching, rows of concurrent requests share one model call; without, each request is one call.
        self._batcher: DynamicBatcher[Row, Prediction] | None = None
        if batching is not None and batching.enabled:
            self._batcher = DynamicBatcher(
                self._run_batch,
                max_rows=batching.max_batch_rows,
                max_delay_s=batching.max_queue_delay_us / 1e6,
                preferred_sizes=batching.preferred_batch_sizes,
                name=f"the {name} tier's batcher",
            )

    @classmethod
    def load(
        cls,
        models_dir: Path,
        manifest: Manifest,
        *,
        backend: str,
        name: str = "edge",
        tracer: trace.Tracer | None = None,
        metrics: GatewayMetrics | None = None,
        batching: BatchingSettings | None = None,
        inline_rows: int = 0,
    ) -> EdgeTier:
        """The edge tier serving the INT8 edge model of `models_dir` on `backend`."""
        return cls(
            EdgeModel.load(models_dir, manifest, backend=backend),
            name=name,
            tracer=tracer,
            metrics=metrics,
            batching=batching,
            inline_rows=inline_rows,
        )

    @property
    def closed(self) -> bool:
        """Whether `close` ran (a retired version's edge tier is closed once its requests are done)."""
        return self._closed

    @property
    def model(self) -> EdgeModel:
        return self._model

    def _predict_sync(self, texts: Sequence[Row]) -> list[Prediction]:
        scored = self._model.predict(texts)
        labels = self._model.labels
        return [
            Prediction(labels[int(index)], probability=float(probability), signal=float(signal))
            for index, probability, signal in zip(scored.label_index, scored.probability, scored.signal, strict=True)
        ]

    async def predict(self, texts: Sequence[Row], deadline: float | None) -> list[Prediction]:
        if self._batcher is None:
            self._batch_rows.observe(len(texts))
        attributes: dict[str, AttributeValue] = {
            "tiergate.tier": self.name,
            "tiergate.edge.backend": self._model.backend.name,
            "tiergate.rows": len(texts),
            "tiergate.batch_size": len(texts),
        }
        with self._tracer.start_as_current_span("tiergate.edge.infer", attributes=attributes):
            if self._batcher is not None:
                return await self._batcher.submit(texts, deadline)
            return await self._call(list(texts))

    async def _run_batch(self, texts: list[Row]) -> list[Prediction]:
        """One model call for a batch the batcher gathered."""
        self._batch_rows.observe(len(texts))
        return await self._call(texts)

    async def _call(self, texts: list[Row]) -> list[Prediction]:
        if len(texts) <= self._inline_rows and not self._on_worker:
            return self._predict_sync(texts)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._predict_sync, texts)
        self._on_worker += 1
        future.add_done_callback(self._worker_done)
        # Shielded: a caller that goes away leaves the call to finish on the worker, still counted as running.
        return await asyncio.shield(future)

    def _worker_done(self, future: asyncio.Future[list[Prediction]]) -> None:
        self._on_worker -= 1
        if not future.cancelled():
            future.exception()  # a caller that went away never reads it: retrieved here, not logged as lost

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        pass  # in-process: nothing to watch

    def expected_latency_s(self) -> float | None:
        return None  # the first tier always runs

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            await self._batcher.close()  # queued requests are answered first
        self._executor.shutdown(wait=True)
        self._model.close()
