"""ONNX Runtime CPU sessions, built one way for the edge and cloud runtimes."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def cpu_session(path: Path, intra_op_threads: int, role: str) -> ort.InferenceSession:
    """A CPU session over `path` with full graph optimisation; `role` names the model in errors."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{role} model file {path} does not exist; build the models with `tiergate models build`"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    # One request at a time per session: a second inter-op pool would only contend for the cores.
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
