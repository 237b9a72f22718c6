"""The edge tier model: featurizer + INT8 backend + temperature and routing signal from the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backend import EdgeBackend
from tiergate.features import HashedNgramFeaturizer
from tiergate.manifest import EDGE_VARIANT_ROLES, Manifest, load_manifest
from tiergate.scoring import Scored, score

BACKENDS = ("onnxruntime", "tensorrt")
VARIANTS = tuple(EDGE_VARIANT_ROLES)


class EdgeModel:
    """Classifies texts on the edge and scores how confident it is."""

    def __init__(
        self,
        labels: list[str],
        signal: str,
        temperature: float,
        backend: EdgeBackend,
        featurizer: HashedNgramFeaturizer,
    ) -> None:
        self.labels = labels
        self.signal = signal
        self.temperature = temperature
        self.backend = backend
        self.featurizer = featurizer

    @classmethod
    def load(
        cls,
        model_dir: Path,
        manifest: Manifest | None = None,
        backend: str = "onnxruntime",
        variant: str = "int8",
        intra_op_threads: int = 1,
    ) -> EdgeModel:
        """Load the edge model of ``model_dir``; ``variant`` is int8 (served), fp32 or qdq (for comparison)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown edge backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown edge variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if backend == "tensorrt":
            raise RuntimeError(
                "TensorRT backend is not available in this build; use backend 'onnxruntime' "
                "(TensorRT needs an NVIDIA GPU with the tensorrt and pycuda packages)"
            )
        if manifest is None:
            manifest = load_manifest(model_dir, roles=[EDGE_VARIANT_ROLES[variant]])
        spec = manifest.edge
        artifact = manifest.artifact_files()[EDGE_VARIANT_ROLES[variant]]
        return cls.from_files(
            Path(model_dir) / artifact.path,
            featurizer_config=spec.featurizer,
            labels=list(manifest.labels),
            signal=manifest.routing.signal,
            temperature=spec.temperature,
            intra_op_threads=intra_op_threads,
        )

    @classmethod
    def from_files(
        cls,
        onnx_path: Path,
        featurizer_config: dict[str, Any],
        labels: list[str],
        signal: str = "max_prob",
        temperature: float = 1.0,
        intra_op_threads: int = 1,
    ) -> EdgeModel:
        """An ONNX Runtime edge model from explicit parts (the build uses this before a manifest exists)."""
        from edge_runtime.onnx_backend import OnnxRuntimeBackend

        return cls(
            labels=list(labels),
            signal=signal,
            temperature=temperature,
            backend=OnnxRuntimeBackend(Path(onnx_path), intra_op_threads=intra_op_threads),
            featurizer=HashedNgramFeaturizer.from_config(featurizer_config),
        )

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """float32 logits [n, K]."""
        if len(texts) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.backend.run(self.featurizer.transform(texts))

    def predict(self, texts: Sequence[str]) -> Scored:
        """Labels, their calibrated probabilities and the routing signal, under the manifest's temperature."""
        return score(self.logits(texts), self.temperature, self.signal)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
