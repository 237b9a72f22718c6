"""The interface every edge inference backend (ONNX Runtime now, TensorRT later) implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class EdgeBackend(Protocol):
    """Runs the edge graph: int32 ids [n, L] in, float32 logits [n, K] out."""

    name: str

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Logits for a batch of featurized rows."""
        ...

    def close(self) -> None:
        """Release the session and any host or device buffers."""
        ...
