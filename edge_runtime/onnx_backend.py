"""ONNX Runtime CPU backend for the edge model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tiergate.onnx_session import cpu_session

logger = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """Runs an edge ONNX graph on the CPU execution provider and returns one of its outputs (`output_name`, or
    the first)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, intra_op_threads: int = 1, output_name: str = "") -> None:
        path = Path(onnx_path)
        self.path = path
        self._session: ort.InferenceSession | None = cpu_session(path, intra_op_threads, "edge ONNX")
        self.inputs = {i.name: i.type for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        if output_name and output_name not in outputs:
            raise ValueError(f"edge ONNX model {path.name} has no output {output_name!r}; it has {outputs}")
        self._output = output_name or outputs[0]
        logger.info("edge backend onnxruntime loaded %s (%d intra-op threads)", path.name, intra_op_threads)

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The output for one batch of feeds (each input's array, first dimension the rows)."""
        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend is closed")
        (out,) = self._session.run([self._output], {name: np.ascontiguousarray(a) for name, a in feeds.items()})
        return np.asarray(out)

    def close(self) -> None:
        """Drop the session; later ``run`` calls fail."""
        self._session = None
