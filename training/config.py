"""Build settings: the cloud and edge model configurations, the build's own settings and the edge's bounds.

Kept free of torch so that configuring (and importing ``training.build``) does not load it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# What an edge model may cost: the served INT8 file and its batch-1 p50 latency (featurizing included).
MAX_EDGE_INT8_BYTES = 25 * 1024 * 1024
MAX_EDGE_P50_MS = 2.0
# The cascade's default quality floor: its accuracy as a ratio to cloud-only accuracy.
QUALITY_FLOOR = 0.99


def within_edge_bounds(int8_bytes: int, p50_ms: float) -> bool:
    """Whether an edge model of this size and batch-1 p50 latency fits the edge's bounds."""
    return int8_bytes <= MAX_EDGE_INT8_BYTES and p50_ms <= MAX_EDGE_P50_MS


@dataclass(frozen=True)
class CloudConfig:
    """Cloud model kind and training settings."""

    kind: str = "minilm"  # "minilm" or "tiny"
    max_length: int = 32
    epochs: int = 3
    batch_size: int = 64
    lr: float = 8e-5
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    dropout: float = 0.1
    tiny_dim: int = 32
    tiny_vocab: int = 600
    label_smoothing: float = 0.0
    bf16: bool = False  # bfloat16 autocast for the training forward pass (fast on CPUs with AVX512-BF16)
    lexical_buckets: int = 0  # 0: no lexical branch
    lexical_max_features: int = 256
    lexical_c: float = 0.5
    lexical_folds: int = 4

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return asdict(self)


@dataclass(frozen=True)
class EdgeConfig:
    """Architecture and training settings of one edge candidate."""

    name: str = "ngram-mlp"
    n_buckets: int = 2**18
    max_features: int = 96
    dim: int = 64
    hidden: int = 256
    dropout: float = 0.2
    epochs: int = 12
    batch_size: int = 256
    lr: float = 2e-3
    embedding_lr: float = 2e-2
    kd_alpha: float = 0.7
    kd_temperature: float = 2.0
    patience: int = 3

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return asdict(self)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that shapes a build besides the data."""

    cloud: CloudConfig = field(default_factory=CloudConfig)
    edge_candidates: tuple[EdgeConfig, ...] = ()
    target_quality: float | None = QUALITY_FLOOR
    target_escalation: float | None = None
    demo_rows: int = 3000
    demo_labels: int | None = None
    limit: int | None = None
    latency_samples: int = 300
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    # Perturbed copies of each training row the edge also trains on (training/augment.py: typos, casing, dropped,
    # reordered and abbreviated words, pack sizes), each with its clean row's labels and teacher logits. 0: none.
    edge_augment_copies: int = 0
    # Calibrate to a quality floor at its lower confidence bound on validation (bootstrap), not its point estimate;
    # the aim (training.calibrate.LOWER_BOUND_AIMS): "ratio", the true ratio holds the floor; "interval", the lower
    # end of the 95% interval an evaluation on a fresh split of the validation split's size reports holds it.
    calibrate_at_lower_bound: bool = False
    lower_bound_aim: str = "ratio"
    # Ship a spelling vocabulary of the training rows that both tiers correct queries with (tiergate.spelling).
    spelling_correction: bool = True
    # Each edge candidate also carries the cloud's lexical branch, fused with its MLP in one graph
    # (training/edge_lexical.py); needs a cloud with a lexical branch small enough for the edge's bounds.
    edge_lexical: bool = False


# What the real and the demo builds' cloud models share: fine-tuned MiniLM, bf16 autocast on the
# CPU, label smoothing, and a lexical branch with out-of-fold margins over 4 folds.
_MINILM = CloudConfig(kind="minilm", head_lr=3e-3, label_smoothing=0.1, bf16=True, lexical_folds=4)


def default_config(real_data: bool) -> BuildConfig:
    """Settings for a demo build (minutes) or a real Instacart build (about half an hour on 2 cores)."""
    if real_data:
        return BuildConfig(
            cloud=replace(
                _MINILM,
                max_length=32,
                epochs=3,
                batch_size=64,
                lr=1.5e-4,
                # 2**16 buckets (as accurate as 2**18 on Instacart aisles) so the edge can carry the same branch.
                lexical_buckets=2**16,
                lexical_max_features=256,
                lexical_c=0.5,
            ),
            edge_candidates=(
                EdgeConfig(name="ngram-mlp-2^18x64", n_buckets=2**18, dim=64, hidden=256),
                EdgeConfig(name="ngram-mlp-2^17x128", n_buckets=2**17, dim=128, hidden=256),
            ),
            edge_augment_copies=1,
            calibrate_at_lower_bound=True,
            lower_bound_aim="interval",
            edge_lexical=True,
        )
    # On the synthetic demo catalogue edge and cloud tie, so a quality floor would never escalate;
    # a fixed escalation rate makes `make run` exercise the whole tier chain.
    return BuildConfig(
        cloud=replace(
            _MINILM, max_length=24, epochs=1, batch_size=32, lr=1e-4, lexical_buckets=2**16, lexical_max_features=128
        ),
        edge_candidates=(EdgeConfig(name="ngram-mlp-2^16x32", n_buckets=2**16, dim=32, hidden=128, epochs=10),),
        target_quality=None,
        target_escalation=0.10,
    )
