"""Tiny but real model sets for tests: same pipeline and file format as a full build, in seconds."""

from __future__ import annotations

import logging
from pathlib import Path

from training.build import build_from_catalogue
from training.config import QUALITY_FLOOR, BuildConfig, CloudConfig, EdgeConfig
from training.data import DEMO_SOURCE, generate_demo_catalogue, grouped_split

logger = logging.getLogger(__name__)

TINY_ROWS = 800
TINY_LABELS = 4


def tiny_config() -> BuildConfig:
    """A tiny word-level + embedding-mean cloud stand-in with a 2**12-bucket lexical branch, and a 2**12-bucket edge."""
    return BuildConfig(
        cloud=CloudConfig(
            kind="tiny",
            max_length=24,
            epochs=12,
            batch_size=32,
            head_lr=2e-2,
            tiny_dim=32,
            tiny_vocab=400,
            lexical_buckets=2**12,
            lexical_max_features=96,
            lexical_folds=3,
        ),
        edge_candidates=(
            EdgeConfig(
                name="ngram-mlp-tiny",
                n_buckets=2**12,
                max_features=64,
                dim=16,
                hidden=32,
                epochs=20,
                batch_size=32,
                lr=5e-3,
                embedding_lr=5e-2,
                dropout=0.0,
                patience=4,
            ),
        ),
        target_quality=QUALITY_FLOOR,
        demo_rows=TINY_ROWS,
        demo_labels=TINY_LABELS,
        latency_samples=50,
        progress=False,
    )


def build_tiny_models(out_dir: Path, seed: int = 0, config: BuildConfig | None = None) -> Path:
    """Write a complete, valid model directory trained on a tiny generated catalogue; returns ``out_dir``."""
    config = config or tiny_config()
    catalogue = generate_demo_catalogue(config.demo_rows, seed=seed, n_labels=config.demo_labels)
    record = {"source": DEMO_SOURCE, "demo_rows": config.demo_rows, "demo_labels": config.demo_labels, "tiny": True}
    manifest = build_from_catalogue(Path(out_dir), catalogue, "aisle", seed, config, record)
    logger.info("tiny models in %s (labels %s)", out_dir, manifest.labels)
    return Path(out_dir)


def tiny_examples(seed: int = 0) -> list[tuple[str, str]]:
    """Held-out (text, label) rows of the tiny catalogue (its test split)."""
    config = tiny_config()
    catalogue = generate_demo_catalogue(config.demo_rows, seed=seed, n_labels=config.demo_labels)
    return catalogue.subset(grouped_split(catalogue.texts, seed).test).examples()
