"""ONNX Runtime CPU backend for the edge model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tiergate.onnx_session import cpu_session

logger = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """Runs the edge ONNX graph (input ``ids``, output ``logits``) on the CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, intra_op_threads: int = 1) -> None:
        path = Path(onnx_path)
        self.path = path
        self._session: ort.InferenceSession | None = cpu_session(path, intra_op_threads, "edge ONNX")
        inputs = self._session.get_inputs()
        if [i.name for i in inputs] != ["ids"]:
            raise ValueError(f"edge ONNX model {path.name} must take one input named 'ids'")
        logger.info("edge backend onnxruntime loaded %s (%d intra-op threads)", path.name, intra_op_threads)

    def run(self, ids: np.ndarray) -> np.ndarray:
        """float32 logits [n, K] for int32 ids [n, L]."""
        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend is closed")
        batch = np.ascontiguousarray(ids, dtype=np.int32)
        if batch.ndim != 2:
            raise ValueError(f"ids must be 2-D [n, L], got shape {batch.shape}")
        (logits,) = self._session.run(["logits"], {"ids": batch})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        """Drop the session; later ``run`` calls fail."""
        self._session = None
