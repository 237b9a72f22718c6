"""The cloud tier model: a fine-tuned transformer classifier served as FP32 ONNX (no torch needed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from tiergate.features import NgramBlocks, encode_batch, prepare_tokenizer
from tiergate.manifest import CLOUD_ROLES, Manifest, load_manifest
from tiergate.onnx_session import cpu_session
from tiergate.scoring import Scored, score

logger = logging.getLogger(__name__)


TOKEN_INPUTS = frozenset({"input_ids", "attention_mask"})
NGRAM_INPUT = "ngram_ids"
# Rows per ONNX Runtime call. The lexical branch gathers [rows, n-grams, labels] floats, so peak
# memory grows with the batch; chunking keeps it flat (about 420 MiB on the Instacart model).
MAX_ROWS_PER_RUN = 256


class CloudModel:
    """Tokenizes with ``tokenizers`` and runs the ONNX classifier (input_ids, attention_mask -> logits).

    A graph with a lexical branch also takes ``ngram_ids`` from the hashed n-gram featurizer the
    manifest describes, and has extra outputs (``deep_logits``, ``lexical_logits``) that
    ``components`` returns for evaluation.
    """

    def __init__(
        self,
        labels: list[str],
        signal: str,
        temperature: float,
        tokenizer: Tokenizer,
        session: ort.InferenceSession,
        max_length: int,
        featurizer: NgramBlocks | None = None,
    ) -> None:
        self.labels = labels
        self.signal = signal
        self.temperature = temperature
        self.max_length = max_length
        self._tokenizer = tokenizer
        self._session: ort.InferenceSession | None = session
        self._pad_id = prepare_tokenizer(tokenizer, max_length)
        self._featurizer = featurizer
        self.outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def from_files(
        cls,
        onnx_path: Path,
        tokenizer_path: Path,
        labels: list[str],
        max_length: int,
        signal: str = "max_prob",
        temperature: float = 1.0,
        intra_op_threads: int = 1,
        featurizer_config: dict[str, Any] | None = None,
    ) -> CloudModel:
        """Load from explicit files (the build uses this before a manifest exists)."""
        if not Path(tokenizer_path).is_file():
            raise FileNotFoundError(
                f"cloud tokenizer {tokenizer_path} does not exist; build the models with `tiergate models build`"
            )
        session = cpu_session(Path(onnx_path), intra_op_threads, "cloud ONNX")
        names = {i.name for i in session.get_inputs()}
        if names not in (TOKEN_INPUTS, TOKEN_INPUTS | {NGRAM_INPUT}):
            raise ValueError(
                f"cloud ONNX model {Path(onnx_path).name} must take input_ids and attention_mask "
                f"(and optionally {NGRAM_INPUT}), has {sorted(names)}"
            )
        if (NGRAM_INPUT in names) != (featurizer_config is not None):
            raise ValueError(
                f"cloud ONNX model {Path(onnx_path).name} "
                + (
                    "takes ngram_ids but the manifest gives no cloud featurizer"
                    if NGRAM_INPUT in names
                    else "takes no ngram_ids but the manifest gives a cloud featurizer"
                )
            )
        logger.info("cloud model loaded %s (%d intra-op threads)", Path(onnx_path).name, intra_op_threads)
        return cls(
            labels=list(labels),
            signal=signal,
            temperature=temperature,
            tokenizer=Tokenizer.from_file(str(tokenizer_path)),
            session=session,
            max_length=max_length,
            featurizer=None if featurizer_config is None else NgramBlocks.from_config(featurizer_config),
        )

    @classmethod
    def load(cls, model_dir: Path, manifest: Manifest | None = None, intra_op_threads: int = 1) -> CloudModel:
        """Load the cloud model of ``model_dir`` (checksums verified when the manifest is read here)."""
        if manifest is None:
            manifest = load_manifest(model_dir, roles=CLOUD_ROLES)
        spec = manifest.cloud
        return cls.from_files(
            Path(model_dir) / spec.onnx.path,
            Path(model_dir) / spec.tokenizer.path,
            labels=list(manifest.labels),
            max_length=spec.max_length,
            signal=manifest.routing.signal,
            temperature=spec.temperature,
            intra_op_threads=intra_op_threads,
            featurizer_config=spec.featurizer,
        )

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 input_ids and attention_mask [n, longest in batch], truncated at max_length."""
        return encode_batch(self._tokenizer, texts, self._pad_id)

    def _run(self, texts: Sequence[str], outputs: list[str]) -> list[np.ndarray]:
        if self._session is None:
            raise RuntimeError("CloudModel is closed")
        if isinstance(texts, str):
            raise TypeError("expected a sequence of strings, not a single string")
        if len(texts) == 0:
            return [np.zeros((0, len(self.labels)), dtype=np.float32) for _ in outputs]
        if len(texts) > MAX_ROWS_PER_RUN:
            chunks = [
                self._run(texts[i : i + MAX_ROWS_PER_RUN], outputs) for i in range(0, len(texts), MAX_ROWS_PER_RUN)
            ]
            return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(outputs))]
        input_ids, mask = self.encode(texts)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if self._featurizer is not None:
            feeds[NGRAM_INPUT] = self._featurizer.transform(texts)
        return [np.asarray(out, dtype=np.float32) for out in self._session.run(outputs, feeds)]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """float32 logits [n, K]."""
        return self._run(texts, ["logits"])[0]

    def components(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Every output of the graph by name (logits, and deep_logits / lexical_logits where present)."""
        return dict(zip(self.outputs, self._run(texts, self.outputs), strict=True))

    def predict(self, texts: Sequence[str]) -> Scored:
        """Labels, their calibrated probabilities and the routing signal, under the manifest's temperature."""
        return score(self.logits(texts), self.temperature, self.signal)

    def close(self) -> None:
        """Drop the ONNX session; later calls fail."""
        self._session = None
