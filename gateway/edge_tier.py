"""The edge tier: the INT8 edge model run in-process; the one gateway module that touches the edge runtime."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.model import EdgeModel
from gateway.tier import Prediction
from tiergate.manifest import Manifest


class EdgeTier:
    """Runs the INT8 edge model on a dedicated thread so the event loop never blocks on inference."""

    def __init__(self, model: EdgeModel, name: str = "edge") -> None:
        self.name = name
        self._model = model
        # One worker: the ONNX session is used by one thread at a time, and requests queue in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge")

    @classmethod
    def load(cls, models_dir: Path, manifest: Manifest, *, backend: str, name: str = "edge") -> EdgeTier:
        """The edge tier serving the INT8 edge model of `models_dir` on `backend`."""
        return cls(EdgeModel.load(models_dir, manifest, backend=backend), name=name)

    @property
    def model(self) -> EdgeModel:
        return self._model

    def _predict_sync(self, texts: Sequence[str]) -> list[Prediction]:
        scored = self._model.predict(texts)
        labels = self._model.labels
        return [
            Prediction(labels[int(index)], float(conf))
            for index, conf in zip(scored.label_index, scored.confidence, strict=True)
        ]

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._predict_sync, list(texts))

    def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._model.close()
