"""The tier interface and the in-process edge tier; tiers share this contract so the chain can hold any of them."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_runtime.model import EdgeModel


@dataclass(frozen=True)
class Prediction:
    """One row's answer from one tier."""

    label: str
    confidence: float


class Tier(Protocol):
    """Something that classifies texts: the in-process edge model or a remote cloud server."""

    name: str

    async def predict(self, texts: Sequence[str], deadline: float | None) -> list[Prediction]:
        """Classify `texts`; `deadline` is an absolute `loop.time()` or None for no limit."""
        ...

    def ready(self) -> bool: ...

    async def close(self) -> None: ...


class EdgeTier:
    """Runs the INT8 edge model on a dedicated thread so the event loop never blocks on inference."""

    def __init__(self, model: EdgeModel, name: str = "edge") -> None:
        self.name = name
        self._model = model
        # One worker: the ONNX session is used by one thread at a time, and requests queue in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge")

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
