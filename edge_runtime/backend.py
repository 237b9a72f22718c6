"""The interface every edge inference backend (ONNX Runtime now, TensorRT later) implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class EdgeBackend(Protocol):
    """Runs the edge graph: named input arrays in (hashed n-gram ids, token ids, or a tensor), one output out."""

    name: str
    # Each graph input's name and ONNX type name, e.g. {"ids": "tensor(int32)"}: what the feeds must fill.
    inputs: dict[str, str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's output (logits or probabilities, as the manifest says) for a batch of rows."""
        ...

    def close(self) -> None:
        """Release the session and any host or device buffers."""
        ...
