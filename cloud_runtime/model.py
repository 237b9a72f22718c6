"""The cloud tier model: the full classifier served as FP32 ONNX (no torch needed), fed as the manifest says.

The built-in task's cloud is a fine-tuned transformer fed by a ``tokenizers`` tokenizer (plus hashed n-grams
for its lexical branch); an imported model's cloud is fed by a tokenizer, hashed n-grams, or the tensor as
sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tiergate.inputs import Feeds, Row, TokenizerFeeds, make_feeds, texts_of
from tiergate.manifest import CLOUD_ROLES, Manifest, ManifestError, load_manifest
from tiergate.onnx_session import cpu_session
from tiergate.scoring import Scored, as_logits, score
from tiergate.spelling import Vocabulary

logger = logging.getLogger(__name__)


# Rows per ONNX Runtime call. The lexical branch gathers [rows, n-grams, labels] floats, so peak
# memory grows with the batch; chunking keeps it flat (about 420 MiB on the Instacart model).
MAX_ROWS_PER_RUN = 256


class CloudModel:
    """Runs the cloud ONNX classifier on its feeds.

    A graph with a lexical branch also has extra outputs (``deep_logits``, ``lexical_logits``) that
    ``components`` returns for evaluation.
    """

    def __init__(
        self,
        labels: list[str],
        signal: str,
        temperature: float,
        session: ort.InferenceSession,
        features: Feeds,
        *,
        scores: str = "logits",
        output_name: str = "",
        spelling: Vocabulary | None = None,
    ) -> None:
        self.labels = labels
        self.spelling = spelling
        self.signal = signal
        self.temperature = temperature
        self.scores = scores
        self._session: ort.InferenceSession | None = session
        self._features = features
        self.outputs = [o.name for o in session.get_outputs()]
        if output_name and output_name not in self.outputs:
            raise ValueError(f"the cloud ONNX model has no output {output_name!r}; it has {self.outputs}")
        self._output = output_name or ("logits" if "logits" in self.outputs else self.outputs[0])

    @classmethod
    def from_files(
        cls,
        onnx_path: Path,
        tokenizer_path: Path | None,
        labels: list[str],
        max_length: int,
        signal: str = "max_prob",
        temperature: float = 1.0,
        intra_op_threads: int = 1,
        featurizer_config: dict[str, Any] | None = None,
        *,
        preprocess: str = "tokenizer",
        scores: str = "logits",
        output_name: str = "",
        spelling_path: Path | None = None,
    ) -> CloudModel:
        """Load from explicit files (the build uses this before a manifest exists)."""
        if tokenizer_path is not None and not Path(tokenizer_path).is_file():
            raise FileNotFoundError(
                f"cloud tokenizer {tokenizer_path} does not exist; build the models with `tiergate models build`"
            )
        spelling = None if spelling_path is None else Vocabulary.load(spelling_path)
        session = cpu_session(Path(onnx_path), intra_op_threads, "cloud ONNX")
        try:
            features = make_feeds(
                preprocess,
                {i.name: i.type for i in session.get_inputs()},
                featurizer=featurizer_config,
                tokenizer_path=tokenizer_path,
                max_length=max_length,
            )
        except ValueError as error:
            raise ValueError(f"cloud ONNX model {Path(onnx_path).name}: {error}") from None
        logger.info("cloud model loaded %s (%d intra-op threads)", Path(onnx_path).name, intra_op_threads)
        return cls(
            labels=list(labels),
            signal=signal,
            temperature=temperature,
            session=session,
            features=features,
            scores=scores,
            output_name=output_name,
            spelling=spelling,
        )

    @classmethod
    def load(cls, model_dir: Path, manifest: Manifest | None = None, intra_op_threads: int = 1) -> CloudModel:
        """Load the cloud model of ``model_dir`` (checksums verified when the manifest is read here)."""
        if manifest is None:
            manifest = load_manifest(model_dir, roles=CLOUD_ROLES)
        spec = manifest.cloud
        if spec.onnx is None:
            raise ManifestError(
                f"model {manifest.task!r} has no cloud ONNX file: its cloud tier relays to an existing OIP server "
                "(serve cloud --upstream HOST:PORT)"
            )
        return cls.from_files(
            Path(model_dir) / spec.onnx.path,
            None if spec.tokenizer is None else Path(model_dir) / spec.tokenizer.path,
            labels=list(manifest.labels),
            max_length=spec.max_length,
            signal=manifest.routing.signal,
            temperature=spec.temperature,
            intra_op_threads=intra_op_threads,
            featurizer_config=spec.featurizer,
            preprocess=spec.preprocess,
            scores=spec.scores,
            output_name=spec.output_name,
            spelling_path=None if manifest.spelling is None else Path(model_dir) / manifest.spelling.path,
        )

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 input_ids and attention_mask [n, longest in batch], truncated at max_length (tokenizer models)."""
        if not isinstance(self._features, TokenizerFeeds):
            raise TypeError("this cloud model is not fed by a tokenizer")
        return self._features.encode(texts_of(texts))

    def _run(self, rows: Sequence[Row], outputs: list[str]) -> list[np.ndarray]:
        if self._session is None:
            raise RuntimeError("CloudModel is closed")
        if isinstance(rows, str):
            raise TypeError("expected a sequence of rows, not a single string")
        if len(rows) == 0:
            return [np.zeros((0, len(self.labels)), dtype=np.float32) for _ in outputs]
        if len(rows) > MAX_ROWS_PER_RUN:
            chunks = [self._run(rows[i : i + MAX_ROWS_PER_RUN], outputs) for i in range(0, len(rows), MAX_ROWS_PER_RUN)]
            return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(outputs))]
        if self.spelling is not None:
            rows = self.spelling.correct_rows(rows)
        return [np.asarray(out) for out in self._session.run(outputs, self._features(rows))]

    def logits(self, rows: Sequence[Row]) -> np.ndarray:
        """float32 logits [n, K]."""
        return as_logits(self._run(rows, [self._output])[0], self.scores, len(self.labels))

    def components(self, rows: Sequence[Row]) -> dict[str, np.ndarray]:
        """Every output of the graph by name (logits, and deep_logits / lexical_logits where present)."""
        return {
            name: np.asarray(out, np.float32)
            for name, out in zip(self.outputs, self._run(rows, self.outputs), strict=False)
        }

    def predict(self, rows: Sequence[Row]) -> Scored:
        """Labels, their calibrated probabilities and the routing signal, under the manifest's temperature."""
        return score(self.logits(rows), self.temperature, self.signal)

    def close(self) -> None:
        """Drop the ONNX session; later calls fail."""
        self._session = None
