"""Builds the edge and cloud models end to end and writes the model directory with its manifest.

With no data directory the build uses the project's generated demo catalogue ("demo data: synthetic"),
so the pipeline runs anywhere in a few minutes; pass the instacart-products directory for real models.
Pipeline: grouped split -> fine-tune the cloud model and export ONNX FP32 -> cloud soft labels ->
distil edge candidates (soft + hard labels) -> export FP32 ONNX -> INT8 (static QDQ and dynamic
per-channel) -> temperature scaling -> escalation signal -> threshold on validation -> metrics -> manifest.

Each stage is a function that takes and returns small frozen dataclasses; ``build_from_catalogue`` runs
them in order and assembles the manifest. Torch is imported inside the stages only.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiergate.features import HashedNgramFeaturizer
from tiergate.manifest import (
    FORMAT_VERSION,
    SPELLING_FORMAT,
    CloudSpec,
    EdgeSpec,
    Manifest,
    RoutingSpec,
    artifact,
    write_manifest,
)
from training.config import BuildConfig, EdgeConfig, default_config, within_edge_bounds
from training.data import (
    DEMO_SOURCE,
    INSTACART_SOURCE,
    SPLIT_FRACTIONS,
    Catalogue,
    DataSplit,
    generate_demo_catalogue,
    grouped_split,
    load_instacart,
)
from training.measure import (
    VariantMeasurement,
    accuracy,
    batch1_latency_ms,
    batched_components,
    batched_logits,
    measure_variant,
    share,
)

if TYPE_CHECKING:
    from torch import nn

    from cloud_runtime.model import CloudModel
    from training.lexical import LexicalModel

logger = logging.getLogger(__name__)

EDGE_DIR = "edge"
CLOUD_DIR = "cloud"
CANDIDATES_DIR = "candidates"
SPELLING_FILE = "spelling.json"
# The INT8 forms an edge candidate may serve, in order of preference when their accuracies tie.
INT8_VARIANTS = ("dynamic_per_channel", "dynamic_per_tensor", "qdq")
CLOUD_THREADS = 2
# torch's intra-op threads for every training step: results depend on it, so it is fixed and recorded.
BUILD_THREADS = 2
CALIBRATION_ROWS = 512  # training rows that set the static QDQ activation ranges


@dataclass(frozen=True)
class LexicalPart:
    """The cloud's lexical branch and its out-of-fold margins on the training rows."""

    model: LexicalModel
    out_of_fold: np.ndarray  # float32 [train rows, K]
    seconds: float


@dataclass(frozen=True)
class CloudStage:
    """The exported cloud model and what the later stages need from it (all on validation unless named)."""

    onnx: Path
    tokenizer: Path
    max_length: int
    featurizer: dict[str, Any] | None  # the lexical branch's NgramBlocks config, None without one
    info: dict[str, Any]
    temperature: float
    validation_logits: np.ndarray
    validation_right: np.ndarray  # bool: the cloud's prediction is right
    teacher_logits: np.ndarray  # the edge's soft labels on the training rows
    lexical_seconds: float | None
    train_seconds: float
    soft_label_seconds: float
    spelling: Path | None  # the spelling vocabulary both tiers read queries through, None without one
    lexical: LexicalModel | None  # the cloud's lexical branch, which an edge candidate may carry too

    def open(self, labels: list[str]) -> CloudModel:
        """The exported model through the serving runtime."""
        return _open_cloud(self.onnx, self.tokenizer, labels, self.max_length, self.featurizer, self.spelling)

    def timings(self) -> dict[str, float]:
        """The cloud stage's build timings for the manifest."""
        lexical = {} if self.lexical_seconds is None else {"cloud_lexical_s": self.lexical_seconds}
        return {**lexical, "cloud_train_s": self.train_seconds, "cloud_soft_labels_s": self.soft_label_seconds}


@dataclass(frozen=True)
class QuantizedForms:
    """The files of one exported edge candidate: FP32 and its three INT8 forms."""

    fp32: Path
    qdq: Path
    dynamic_per_channel: Path
    dynamic_per_tensor: Path

    def items(self) -> list[tuple[str, Path]]:
        """(variant name, path) of every form, FP32 first."""
        return [
            ("fp32", self.fp32),
            ("qdq", self.qdq),
            ("dynamic_per_channel", self.dynamic_per_channel),
            ("dynamic_per_tensor", self.dynamic_per_tensor),
        ]

    def path(self, variant: str) -> Path:
        """The file of ``variant``."""
        return dict(self.items())[variant]


@dataclass(frozen=True)
class EdgeCandidate:
    """One distilled, exported and quantized edge architecture, measured on validation through the runtime."""

    config: EdgeConfig
    training: dict[str, Any]
    train_seconds: float
    forms: QuantizedForms
    variants: dict[str, VariantMeasurement]
    served_variant: str
    temperature: float
    featurizer: dict[str, Any]  # HashedNgramFeaturizer config, or NgramBlocks config when it carries the lexical branch
    escalation_at_quality_floor: float  # NaN without a quality target
    best_signal_at_floor: str
    within_bounds: bool

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def served(self) -> VariantMeasurement:
        """The measurement of the served INT8 form."""
        return self.variants[self.served_variant]

    @property
    def validation_logits(self) -> np.ndarray:
        """The served form's logits on the validation rows."""
        return self.served.logits

    def variant_metrics(self) -> dict[str, dict[str, Any]]:
        """Each form's measurement in manifest form."""
        return {variant: measured.as_dict() for variant, measured in self.variants.items()}


@dataclass(frozen=True)
class ServedEdgeFiles:
    """The chosen candidate's files in the model directory."""

    int8: Path
    qdq: Path
    fp32: Path


@dataclass(frozen=True)
class Calibration:
    """The escalation signal chosen on validation and the routing threshold for the target."""

    signal: str
    aurocs: dict[str, float]
    routing: RoutingSpec


@dataclass(frozen=True)
class TestMetrics:
    """Held-out test metrics through the runtime, and batch-1 latencies."""

    rows: int
    edge_int8_accuracy: float
    edge_fp32_accuracy: float
    cloud_accuracy: float
    cascade_accuracy: float
    escalation_rate: float
    edge_latency_ms: dict[str, float]
    cloud_latency_ms: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """The manifest's ``metrics.test``."""
        return {
            "rows": self.rows,
            "edge_int8_accuracy": self.edge_int8_accuracy,
            "edge_fp32_accuracy": self.edge_fp32_accuracy,
            "cloud_accuracy": self.cloud_accuracy,
            "cascade_accuracy": self.cascade_accuracy,
            "escalation_rate": self.escalation_rate,
        }


def load_catalogue(data_dir: Path | None, task: str, seed: int, config: BuildConfig) -> Catalogue:
    """The demo catalogue (data_dir None) or the Instacart catalogue for ``task``."""
    if data_dir is None:
        if task != "aisle":
            raise ValueError("the demo catalogue only has the aisle task")
        return generate_demo_catalogue(config.demo_rows, seed=seed, n_labels=config.demo_labels)
    return load_instacart(Path(data_dir), task=task, limit=config.limit, seed=seed)


def _open_cloud(
    onnx: Path,
    tokenizer: Path,
    labels: list[str],
    max_length: int,
    featurizer: dict[str, Any] | None,
    spelling: Path | None,
) -> CloudModel:
    from cloud_runtime.model import CloudModel

    return CloudModel.from_files(
        onnx,
        tokenizer,
        labels,
        max_length,
        intra_op_threads=CLOUD_THREADS,
        featurizer_config=featurizer,
        spelling_path=spelling,
    )


def write_spelling(out_dir: Path, texts: list[str]) -> Path:
    """The query spelling vocabulary of the training rows (tiergate.spelling), which both tiers read queries
    through. The build measures the exported models through it, as they will be served (each candidate's forms,
    the cloud's validation logits, calibration and test); training and the cloud's fusion read the rows as they
    are, which the vocabulary leaves unchanged on the training rows and on all but a few validation rows."""
    from tiergate.spelling import Vocabulary

    return Vocabulary.from_texts(texts).save(out_dir / SPELLING_FILE)


def alternative_row(
    name: str,
    variants: dict[str, VariantMeasurement],
    served_variant: str,
    escalation_at_quality_floor: float,
    within_bounds: bool,
    train_seconds: float,
    chosen: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of the manifest's ``metrics.edge_alternatives`` (``extra`` goes before ``chosen``)."""
    return {
        "name": name,
        "served_variant": served_variant,
        "validation_accuracy": {variant: measured.validation_accuracy for variant, measured in variants.items()},
        "int8_bytes": variants[served_variant].bytes,
        "batch1_latency_ms_p50": variants[served_variant].batch1_latency_ms["p50"],
        "escalation_at_quality_floor": escalation_at_quality_floor,
        "within_bounds": within_bounds,
        "train_seconds": train_seconds,
        **(extra or {}),
        "chosen": chosen,
    }


def train_lexical_part(data: DataSplit, n_labels: int, config: BuildConfig) -> LexicalPart:
    """Fit the cloud's lexical branch on the training rows, with out-of-fold margins for those rows."""
    from training.lexical import train_lexical

    cc = config.cloud
    started = time.perf_counter()
    model, out_of_fold = train_lexical(
        data.train.texts,
        data.train.y,
        n_labels,
        cc.lexical_buckets,
        cc.lexical_max_features,
        cc.lexical_c,
        cc.lexical_folds,
    )
    return LexicalPart(model=model, out_of_fold=out_of_fold, seconds=round(time.perf_counter() - started, 1))


def train_cloud_stage(
    out_dir: Path, data: DataSplit, labels: list[str], config: BuildConfig, seed: int, spelling: Path | None
) -> CloudStage:
    """Train the cloud model (the lexical branch and the deep model, each on its own, fused on validation into
    one ONNX graph), export it, and read it back through the serving runtime for the soft labels."""
    from tiergate.features import prepare_tokenizer
    from training.calibrate import fit_temperature
    from training.cloud_train import (
        FusedCloudNet,
        export_cloud_onnx,
        fit_fusion,
        fuse,
        predict_cloud,
        save_tokenizer,
        train_cloud,
    )

    cc = config.cloud
    train, val = data.train, data.validation
    lexical = train_lexical_part(data, len(labels), config) if cc.lexical_buckets else None
    started = time.perf_counter()
    cloud_net, tokenizer, info = train_cloud(
        cc, train.texts, train.y, len(labels), val.texts, val.y, seed=seed, progress=config.progress
    )
    train_seconds = round(time.perf_counter() - started, 1)
    fusion = None
    if lexical is not None:
        val_lexical = lexical.model.margins(lexical.model.featurize(val.texts))
        deep_val = predict_cloud(cloud_net, tokenizer, prepare_tokenizer(tokenizer, cc.max_length), val.texts)
        fusion = fit_fusion(deep_val, val_lexical, val.y)
        info["fusion"] = fusion.as_dict()
        info["validation_accuracy_by_part"] = {
            "deep": accuracy(deep_val, val.y),
            "lexical": accuracy(val_lexical, val.y),
            "fused": accuracy(fuse(deep_val, val_lexical, fusion), val.y),
        }
        info["lexical_out_of_fold_accuracy"] = accuracy(lexical.out_of_fold, train.y)
        cloud_net = FusedCloudNet(cloud_net, lexical.model, fusion)
    onnx = export_cloud_onnx(cloud_net, out_dir / CLOUD_DIR / "cloud_fp32.onnx")
    tokenizer_path = save_tokenizer(tokenizer, out_dir / CLOUD_DIR / "tokenizer.json", cc.max_length)
    del cloud_net
    featurizer = lexical.model.featurizer if lexical is not None else None
    cloud = _open_cloud(onnx, tokenizer_path, labels, cc.max_length, featurizer, spelling)
    try:
        started = time.perf_counter()
        if lexical is not None and fusion is not None:
            # The lexical branch has memorised the training rows; on them the edge's teacher sees its
            # out-of-fold margins instead, as it would on rows it never saw.
            teacher = fuse(batched_components(cloud, train.texts)["deep_logits"], lexical.out_of_fold, fusion)
        else:
            teacher = batched_logits(cloud, train.texts)
        cloud_val = batched_logits(cloud, val.texts)
        soft_label_seconds = round(time.perf_counter() - started, 1)
    finally:
        cloud.close()
    return CloudStage(
        onnx=onnx,
        tokenizer=tokenizer_path,
        max_length=cc.max_length,
        featurizer=featurizer,
        info=info,
        temperature=fit_temperature(cloud_val, val.y),
        validation_logits=cloud_val,
        validation_right=cloud_val.argmax(1) == val.y,
        teacher_logits=teacher,
        lexical_seconds=lexical.seconds if lexical is not None else None,
        train_seconds=train_seconds,
        soft_label_seconds=soft_label_seconds,
        spelling=spelling,
        lexical=lexical.model if lexical is not None else None,
    )


def export_quantized_forms(
    net: nn.Module, folder: Path, max_features: int, calibration_ids: np.ndarray
) -> QuantizedForms:
    """FP32 ONNX of the trained edge network and its INT8 forms (static QDQ, dynamic per channel and per tensor)."""
    from training.edge_train import export_edge_onnx
    from training.quantize import quantize_dynamic_int8, quantize_qdq

    fp32 = export_edge_onnx(net, folder / "edge_fp32.onnx", max_features)
    return QuantizedForms(
        fp32=fp32,
        qdq=quantize_qdq(fp32, folder / "edge_int8_qdq.onnx", calibration_ids),
        dynamic_per_channel=quantize_dynamic_int8(fp32, folder / "edge_int8_dynamic_pc.onnx", per_channel=True),
        dynamic_per_tensor=quantize_dynamic_int8(fp32, folder / "edge_int8_dynamic_pt.onnx", per_channel=False),
    )


def measure_edge_forms(
    forms: QuantizedForms,
    featurizer: dict[str, Any],
    labels: list[str],
    val: Catalogue,
    samples: int,
    spelling: Path | None = None,
) -> dict[str, VariantMeasurement]:
    """Each form's validation accuracy, size and batch-1 latency through the edge runtime."""
    from edge_runtime.model import EdgeModel

    measured: dict[str, VariantMeasurement] = {}
    for variant, path in forms.items():
        model = EdgeModel.from_files(path, featurizer, labels, spelling_path=spelling)
        try:
            measured[variant] = measure_variant(model, path, val.texts, val.y, samples)
        finally:
            model.close()
    return measured


def served_form(variants: dict[str, VariantMeasurement]) -> str:
    """The INT8 form to serve: the best validation accuracy among the forms within the edge's bounds (among all
    when none is). Ties go to the first in INT8_VARIANTS (per-channel), not to the faster form. Which forms fit
    rests on measured latency, but the bound (2 ms) is far from every form's latency here (about 0.1-0.3 ms
    dynamic, 7 ms QDQ on CPU), so builds stay reproducible; a form measuring near the bound could flip between
    builds."""
    fitting = [v for v in INT8_VARIANTS if within_edge_bounds(variants[v].bytes, variants[v].batch1_latency_ms["p50"])]
    return max(fitting or INT8_VARIANTS, key=lambda v: (variants[v].validation_accuracy, -INT8_VARIANTS.index(v)))


def train_edge_candidate(
    edge_config: EdgeConfig,
    out_dir: Path,
    data: DataSplit,
    labels: list[str],
    cloud: CloudStage,
    config: BuildConfig,
    seed: int,
) -> EdgeCandidate:
    """Distil one edge architecture from the cloud's soft labels, export and quantize it, and measure it.

    With ``config.edge_lexical`` (and a cloud that has a lexical branch) the exported graph also carries the
    cloud's lexical branch, fused with the distilled MLP (``training.edge_lexical``)."""

    from training.calibrate import fit_temperature, least_escalation_at_floor
    from training.edge_lexical import with_lexical
    from training.edge_train import predict_edge, train_edge

    started = time.perf_counter()
    from training.augment import augmented

    train, val = data.train, data.validation
    featurizer = HashedNgramFeaturizer(n_buckets=edge_config.n_buckets, max_features=edge_config.max_features)
    train_ids, val_ids = featurizer.transform(train.texts), featurizer.transform(val.texts)
    fit_ids, fit_y, teacher = train_ids, train.y, cloud.teacher_logits
    copies = config.edge_augment_copies
    if copies > 0:
        # Queries as shoppers type them: each copy keeps its clean row's label and the teacher's view of it.
        texts, ys = augmented(train.texts, [int(y) for y in train.y], copies, seed)
        fit_ids = np.concatenate([train_ids, featurizer.transform(texts[len(train.texts) :])])
        fit_y = np.asarray(ys, dtype=train.y.dtype)
        teacher = np.tile(teacher, (copies + 1, 1))
    net, training_info = train_edge(
        edge_config,
        fit_ids,
        fit_y,
        len(labels),
        val_ids,
        val.y,
        teacher_logits=teacher,
        seed=seed,
        progress=config.progress,
    )
    training_info["augment_copies"] = copies
    pick = np.random.default_rng(seed).permutation(len(train_ids))[:CALIBRATION_ROWS]
    served_net: nn.Module = net
    served_featurizer, calibration_ids = featurizer.config(), train_ids[pick]
    if config.edge_lexical and cloud.lexical is not None:
        served_net, blocks, fusion_info = with_lexical(
            net, featurizer, cloud.lexical, predict_edge(net, val_ids), val.texts, val.y
        )
        training_info["lexical_branch"] = fusion_info
        served_featurizer = blocks.config()
        calibration_ids = blocks.transform([train.texts[i] for i in pick])
    folder = out_dir / CANDIDATES_DIR / edge_config.name
    forms = export_quantized_forms(served_net, folder, calibration_ids.shape[1], calibration_ids)
    variants = measure_edge_forms(forms, served_featurizer, labels, val, config.latency_samples, cloud.spelling)
    served = served_form(variants)
    temperature = fit_temperature(variants[served].logits, val.y)
    escalation, signal = (
        least_escalation_at_floor(
            variants[served].logits, temperature, val.y, cloud.validation_right, config.target_quality
        )
        if config.target_quality is not None
        else (float("nan"), "max_prob")
    )
    candidate = EdgeCandidate(
        config=edge_config,
        training=training_info,
        train_seconds=round(time.perf_counter() - started, 1),
        forms=forms,
        variants=variants,
        served_variant=served,
        temperature=temperature,
        featurizer=served_featurizer,
        escalation_at_quality_floor=escalation,
        best_signal_at_floor=signal,
        within_bounds=within_edge_bounds(variants[served].bytes, variants[served].batch1_latency_ms["p50"]),
    )
    logger.info("edge candidate %s: %s", edge_config.name, {v: m.validation_accuracy for v, m in variants.items()})
    return candidate


# Escalation-at-floor differences between edge candidates smaller than this are noise on a validation split of
# this size (its bootstrap interval is about two points wide): within it, accuracy decides, then size.
SELECTION_MARGIN = 0.01


def choose_candidate(candidates: list[EdgeCandidate]) -> EdgeCandidate:
    """Among the candidates within the edge's bounds (all, when none is): those within SELECTION_MARGIN of the
    least escalation at the quality floor, and of those the best served validation accuracy, then the smallest
    (fewer embedding parameters), then the first listed."""
    eligible = [c for c in candidates if c.within_bounds] or candidates

    def escalation(c: EdgeCandidate) -> float:
        return c.escalation_at_quality_floor if np.isfinite(c.escalation_at_quality_floor) else 0.0

    least = min(escalation(c) for c in eligible)
    contenders = [c for c in eligible if escalation(c) <= least + SELECTION_MARGIN + 1e-12]
    return max(
        contenders,
        key=lambda c: (
            c.served.validation_accuracy,
            -c.config.n_buckets * c.config.dim,
            -eligible.index(c),
        ),
    )


def install_edge(out_dir: Path, chosen: EdgeCandidate) -> ServedEdgeFiles:
    """Copy the chosen candidate's served INT8, QDQ and FP32 files into place and drop the candidates."""
    edge_dir = out_dir / EDGE_DIR
    edge_dir.mkdir(parents=True, exist_ok=True)
    files = ServedEdgeFiles(
        int8=edge_dir / "edge_int8.onnx", qdq=edge_dir / "edge_int8_qdq.onnx", fp32=edge_dir / "edge_fp32.onnx"
    )
    shutil.copyfile(chosen.forms.path(chosen.served_variant), files.int8)
    shutil.copyfile(chosen.forms.qdq, files.qdq)
    shutil.copyfile(chosen.forms.fp32, files.fp32)
    shutil.rmtree(out_dir / CANDIDATES_DIR, ignore_errors=True)
    return files


def calibrate_routing(chosen: EdgeCandidate, val: Catalogue, cloud: CloudStage, config: BuildConfig) -> Calibration:
    """The confidence signal with the best validation AUROC and the threshold meeting the build's target."""
    from tiergate.scoring import score
    from training.calibrate import routing_from_predictions, signal_aurocs

    aurocs = signal_aurocs(chosen.validation_logits, chosen.temperature, val.y)
    signal = max(aurocs, key=lambda s: aurocs[s])
    scored = score(chosen.validation_logits, chosen.temperature, signal)
    routing = routing_from_predictions(
        signal,
        scored.signal,
        scored.label_index == val.y,
        cloud.validation_right,
        target_escalation=config.target_escalation,
        target_quality=config.target_quality if config.target_escalation is None else None,
        extra={"signal_auroc": aurocs},
        agreement=scored.label_index == cloud.validation_logits.argmax(1),
        lower_bound=config.calibrate_at_lower_bound and config.target_escalation is None,
        lower_bound_aim=config.lower_bound_aim,
    )
    return Calibration(signal=signal, aurocs=aurocs, routing=routing)


def measure_test(
    files: ServedEdgeFiles,
    chosen: EdgeCandidate,
    cloud: CloudStage,
    calibration: Calibration,
    data: DataSplit,
    labels: list[str],
    config: BuildConfig,
) -> TestMetrics:
    """Held-out test metrics through the runtime (reporting only: no earlier stage saw the test split)."""
    from edge_runtime.model import EdgeModel
    from tiergate.scoring import score

    test, val = data.test, data.validation
    signal, temperature = calibration.signal, chosen.temperature
    spelling = cloud.spelling
    edge_model = EdgeModel.from_files(
        files.int8, chosen.featurizer, labels, signal, temperature, spelling_path=spelling
    )
    edge_fp32_model = EdgeModel.from_files(
        files.fp32, chosen.featurizer, labels, signal, temperature, spelling_path=spelling
    )
    cloud_model = cloud.open(labels)
    try:
        edge_test = batched_logits(edge_model, test.texts)
        edge_fp32_test = batched_logits(edge_fp32_model, test.texts)
        cloud_test = batched_logits(cloud_model, test.texts)
        edge_latency = batch1_latency_ms(edge_model, test.texts or val.texts, config.latency_samples)
        cloud_latency = batch1_latency_ms(cloud_model, test.texts or val.texts, min(config.latency_samples, 200))
    finally:
        edge_model.close()
        edge_fp32_model.close()
        cloud_model.close()
    test_scored = score(edge_test, temperature, signal)
    escalate = test_scored.signal < calibration.routing.threshold
    edge_right = test_scored.label_index == test.y
    cloud_right = cloud_test.argmax(1) == test.y
    return TestMetrics(
        rows=len(test),
        edge_int8_accuracy=share(edge_right),
        edge_fp32_accuracy=accuracy(edge_fp32_test, test.y),
        cloud_accuracy=share(cloud_right),
        cascade_accuracy=share(np.where(escalate, cloud_right, edge_right)),
        escalation_rate=share(escalate),
        edge_latency_ms=edge_latency,
        cloud_latency_ms=cloud_latency,
    )


def build_from_catalogue(
    out_dir: Path, catalogue: Catalogue, task: str, seed: int, config: BuildConfig, data_record: dict[str, Any]
) -> Manifest:
    """Run the whole pipeline on ``catalogue`` and write the model directory (shared by real, demo and tiny builds)."""
    import torch

    from training.reproducibility import environment_record

    torch.set_num_threads(BUILD_THREADS)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in (EDGE_DIR, CLOUD_DIR, CANDIDATES_DIR):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    labels = catalogue.labels
    data = DataSplit.of(catalogue, grouped_split(catalogue.texts, seed))
    logger.info("split %s over %d labels", data.split.sizes(), len(labels))

    spelling = write_spelling(out_dir, data.train.texts) if config.spelling_correction else None
    cloud = train_cloud_stage(out_dir, data, labels, config, seed, spelling)
    edge_started = time.perf_counter()
    candidates = [train_edge_candidate(c, out_dir, data, labels, cloud, config, seed) for c in config.edge_candidates]
    edge_seconds = round(time.perf_counter() - edge_started, 1)
    chosen = choose_candidate(candidates)
    files = install_edge(out_dir, chosen)
    calibration = calibrate_routing(chosen, data.validation, cloud, config)
    test = measure_test(files, chosen, cloud, calibration, data, labels, config)
    timings = {**cloud.timings(), "edge_train_quantize_s": edge_seconds}
    timings["total_s"] = round(time.perf_counter() - started, 1)

    edge_metrics = {
        "architecture": chosen.name,
        "config": chosen.config.as_dict(),
        "served_variant": chosen.served_variant,
        "variants": chosen.variant_metrics(),
        "int8_bytes": files.int8.stat().st_size,
        "qdq_bytes": files.qdq.stat().st_size,
        "fp32_bytes": files.fp32.stat().st_size,
        "batch1_latency_ms_with_featurize": test.edge_latency_ms,
        "training": chosen.training,
        "validation_accuracy": chosen.served.validation_accuracy,
    }
    cloud_metrics = {
        "config": config.cloud.as_dict(),
        "training": cloud.info,
        "validation_accuracy": share(cloud.validation_right),
        "fp32_bytes": cloud.onnx.stat().st_size,
        "batch1_latency_ms": test.cloud_latency_ms,
    }
    alternatives = [
        alternative_row(
            c.name,
            c.variants,
            c.served_variant,
            c.escalation_at_quality_floor,
            c.within_bounds,
            c.train_seconds,
            chosen=c is chosen,
        )
        for c in candidates
    ]
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    manifest = Manifest(
        format_version=FORMAT_VERSION if spelling is None else SPELLING_FORMAT,
        version=created.strftime("%Y%m%dT%H%M%SZ"),
        created_at=created.isoformat(),
        task=task,
        data={
            **data_record,
            "seed": seed,
            "reproducibility": environment_record(seed, BUILD_THREADS),
            "fractions": list(SPLIT_FRACTIONS),
            "sizes": data.split.sizes(),
            "grouping": "normalised product name",
            "label_parents": catalogue.parents,
        },
        labels=list(labels),
        edge=EdgeSpec(
            onnx=artifact(out_dir, files.int8),
            qdq_onnx=artifact(out_dir, files.qdq),
            fp32_onnx=artifact(out_dir, files.fp32),
            featurizer=chosen.featurizer,
            temperature=float(chosen.temperature),
            metrics=edge_metrics,
        ),
        cloud=CloudSpec(
            onnx=artifact(out_dir, cloud.onnx),
            tokenizer=artifact(out_dir, cloud.tokenizer),
            max_length=int(config.cloud.max_length),
            temperature=float(cloud.temperature),
            metrics=cloud_metrics,
            featurizer=cloud.featurizer,
        ),
        routing=calibration.routing,
        spelling=None if spelling is None else artifact(out_dir, spelling),
        metrics={
            "test": test.as_dict(),
            "timings_s": timings,
            "edge_alternatives": alternatives,
            **config.extra,
        },
    )
    write_manifest(out_dir, manifest)
    logger.info("wrote %s in %.0f s; test %s", out_dir, timings["total_s"], json.dumps(test.as_dict()))
    return manifest


def build_models(
    out_dir: Path,
    data_dir: Path | None = None,
    task: str = "aisle",
    seed: int = 0,
    config: BuildConfig | None = None,
    limit: int | None = None,
) -> Manifest:
    """Build both tiers into ``out_dir`` from the demo catalogue (data_dir None) or an instacart-products dir."""
    config = config or default_config(real_data=data_dir is not None)
    if limit is not None:
        config = replace(config, limit=limit)
    catalogue = load_catalogue(data_dir, task, seed, config)
    if data_dir is None:
        record: dict[str, Any] = {
            "source": DEMO_SOURCE,
            "demo_rows": config.demo_rows,
            "demo_labels": config.demo_labels,
        }
    else:
        record = {"source": INSTACART_SOURCE, "limit": config.limit}
    return build_from_catalogue(Path(out_dir), catalogue, task, seed, config, record)
