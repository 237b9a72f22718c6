"""The edge tier model: its feeds (hashed n-grams, a tokenizer, or the tensor as sent), an INT8 backend, and the
temperature and routing signal from the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backend import EdgeBackend
from tiergate.inputs import Feeds, Row, make_feeds
from tiergate.manifest import EDGE_ROLES, EDGE_VARIANT_ROLES, Manifest, load_manifest
from tiergate.scoring import Scored, as_logits, score
from tiergate.spelling import Vocabulary

BACKENDS = ("onnxruntime", "tensorrt")
VARIANTS = tuple(EDGE_VARIANT_ROLES)


class EdgeModel:
    """Classifies rows on the edge and scores how confident it is."""

    def __init__(
        self,
        labels: list[str],
        signal: str,
        temperature: float,
        backend: EdgeBackend,
        features: Feeds,
        scores: str = "logits",
        spelling: Vocabulary | None = None,
    ) -> None:
        self.labels = labels
        self.signal = signal
        self.temperature = temperature
        self.backend = backend
        self.features = features
        self.scores = scores
        self.spelling = spelling

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
        role = EDGE_VARIANT_ROLES[variant]
        if manifest is None:
            manifest = load_manifest(model_dir, roles=[role, *EDGE_ROLES])
        spec = manifest.edge
        artifact = manifest.artifact_files().get(role)
        if artifact is None:
            raise ValueError(f"this model has no {variant} edge file (only the served one was imported)")
        return cls.from_files(
            Path(model_dir) / artifact.path,
            featurizer_config=spec.featurizer,
            labels=list(manifest.labels),
            signal=manifest.routing.signal,
            temperature=spec.temperature,
            intra_op_threads=intra_op_threads,
            preprocess=spec.preprocess,
            tokenizer_path=None if spec.tokenizer is None else Path(model_dir) / spec.tokenizer.path,
            max_length=spec.max_length,
            scores=spec.scores,
            output_name=spec.output_name,
            spelling_path=None if manifest.spelling is None else Path(model_dir) / manifest.spelling.path,
        )

    @classmethod
    def from_files(
        cls,
        onnx_path: Path,
        featurizer_config: dict[str, Any] | None,
        labels: list[str],
        signal: str = "max_prob",
        temperature: float = 1.0,
        intra_op_threads: int = 1,
        *,
        preprocess: str = "ngrams",
        tokenizer_path: Path | None = None,
        max_length: int = 0,
        scores: str = "logits",
        output_name: str = "",
        spelling_path: Path | None = None,
    ) -> EdgeModel:
        """An ONNX Runtime edge model from explicit parts (the build uses this before a manifest exists)."""
        from edge_runtime.onnx_backend import OnnxRuntimeBackend

        spelling = None if spelling_path is None else Vocabulary.load(spelling_path)
        backend = OnnxRuntimeBackend(Path(onnx_path), intra_op_threads=intra_op_threads, output_name=output_name)
        try:
            features = make_feeds(
                preprocess,
                backend.inputs,
                featurizer=featurizer_config,
                tokenizer_path=tokenizer_path,
                max_length=max_length,
            )
        except ValueError as error:
            backend.close()
            raise ValueError(f"edge ONNX model {Path(onnx_path).name}: {error}") from None
        return cls(
            labels=list(labels),
            signal=signal,
            temperature=temperature,
            backend=backend,
            features=features,
            scores=scores,
            spelling=spelling,
        )

    def logits(self, rows: Sequence[Row]) -> np.ndarray:
        """float32 logits [n, K]."""
        if len(rows) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        if self.spelling is not None:
            rows = self.spelling.correct_rows(rows)
        return as_logits(self.backend.run(self.features(rows)), self.scores, len(self.labels))

    def predict(self, rows: Sequence[Row]) -> Scored:
        """Labels, their calibrated probabilities and the routing signal, under the manifest's temperature."""
        return score(self.logits(rows), self.temperature, self.signal)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
