"""INT8 quantization of the edge ONNX graph: static QDQ (for TensorRT) and dynamic per-channel (for CPU)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime.quantization
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

logger = logging.getLogger(__name__)

_QUANTIZER_DIR = str(Path(onnxruntime.quantization.__file__).parent)


class _QuantizerNotices(logging.Filter):
    """Moves onnxruntime.quantization's notices off the console: it logs them on the root logger ("consider
    pre-processing", "quantization parameters for tensor ... not specified"), expected for these graphs.
    They are logged again at DEBUG under this module's logger; errors pass through untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.pathname.startswith(_QUANTIZER_DIR):
            return True
        logger.debug("onnxruntime quantization: %s", record.getMessage())
        return False


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """For one quantization call: the quantizer's log notices at DEBUG, and what it prints to stdout too."""
    root = logging.getLogger()
    notices = _QuantizerNotices()
    printed = io.StringIO()
    root.addFilter(notices)  # a logger's own filters see exactly the records logged on it: here, the root's
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(notices)
        if printed.getvalue().strip():
            logger.debug("onnxruntime quantization printed: %s", printed.getvalue().strip())


class _FeedsReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
    """Feeds calibration batches (each graph input's array, by name) to the static quantizer."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        batch = self._batches[self._next]
        self._next += 1
        return batch

    def rewind(self) -> None:
        self._next = 0


def quantize_qdq(fp32_path: Path, out_path: Path, calibration_ids: np.ndarray) -> Path:
    """Static INT8 in QDQ format, symmetric signed weights and activations, per-channel weights.

    Symmetric INT8 QDQ is the form TensorRT consumes; the calibration set sets activation ranges.
    """
    ids = calibration_ids
    batches = [{"ids": ids[i : i + 64].astype(np.int32)} for i in range(0, len(ids), 64)]
    return quantize_qdq_feeds(fp32_path, out_path, batches)


def quantize_qdq_feeds(fp32_path: Path, out_path: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """`quantize_qdq` for any graph: `batches` are its calibration feeds, each input's array by name."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_quantizer():
        quantize_static(
            str(fp32_path),
            str(out_path),
            _FeedsReader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Gather", "MatMul", "Gemm"],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    return out_path


def quantize_dynamic_int8(fp32_path: Path, out_path: Path, per_channel: bool = True) -> Path:
    """Dynamic INT8 (weights quantized offline, activations at run time), optionally per channel."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_quantizer():
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Gather", "MatMul", "Gemm"],
        )
    return out_path
