"""The evaluation report: edge, cloud and cascade accuracy against escalation, run through the serving runtime."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from tiergate.manifest import Manifest, load_manifest
from tiergate.scoring import SIGNALS, score
from training.calibrate import auroc, cascade_curve
from training.config import QUALITY_FLOOR
from training.data import load_bigbasket_departments, load_split_for_manifest
from training.measure import accuracy, batch1_latency_ms, batched_components, batched_logits, bootstrap_ci, share

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
# Quoted from instacart-products/SOURCE.md (TF-IDF word 1-2 + char_wb 2-5 grams, LinearSVC).
BASELINE_TFIDF_SVM = {"aisle": 0.787, "department": 0.867}
MAX_ESCALATION = 0.15
# Test rows each perturbation family is applied to (a seeded sample: the cloud model runs on every copy).
ROBUSTNESS_ROWS = 2000
ROBUSTNESS_SEED = 2024
UNCORRECTED_MISSPELL = "misspell, no spelling correction"
# Misspelled queries must keep this share of the clean rows' cascade accuracy.
ROBUSTNESS_FLOOR = 0.95


def _macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    scores = []
    for label in np.unique(gold):
        tp = float(np.sum((pred == label) & (gold == label)))
        fp = float(np.sum((pred == label) & (gold != label)))
        fn = float(np.sum((pred != label) & (gold == label)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def tfidf_svm_baseline(train_texts: list[str], train_y: np.ndarray, test_texts: list[str]) -> np.ndarray:
    """Predicted label indices of the reference model (TF-IDF word 1-2 + char_wb 2-5 grams, LinearSVC C=0.5),
    trained on ``train_texts``: the baseline measured on the same split as the models."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    )
    return np.asarray(
        make_pipeline(features, LinearSVC(C=0.5, random_state=0)).fit(train_texts, train_y).predict(test_texts)
    )


def _same_split_baseline(
    train_texts: list[str],
    train_y: np.ndarray,
    test_texts: list[str],
    test_y: np.ndarray,
    task: str,
    to_group: np.ndarray,
) -> dict[str, Any]:
    """The reference model's test accuracy on the models' own split, for the task and (aisles) departments.

    The department baseline is its own SVM fitted on department labels, as the quoted one is.
    """
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": "TF-IDF word 1-2 + char_wb 2-5 grams (sublinear tf), LinearSVC C=0.5, "
        "fitted on this build's train split",
        task: accuracy(tfidf_svm_baseline(train_texts, train_y, test_texts), test_y),
    }
    if task == "aisle":
        department_pred = tfidf_svm_baseline(train_texts, to_group[train_y], test_texts)
        result["department"] = accuracy(department_pred, to_group[test_y])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _curve_points(
    confidence: np.ndarray, edge_right: np.ndarray, cloud_right: np.ndarray, points: int = 101
) -> dict[str, list[float]]:
    """The cascade curve resampled at evenly spaced escalation rates (for JSON and the plot)."""
    curve = cascade_curve(confidence, edge_right, cloud_right)
    grid = np.linspace(0.0, 1.0, points)
    index = np.searchsorted(curve.escalation, grid, side="left").clip(0, len(curve.escalation) - 1)
    return {
        "escalation": [round(float(curve.escalation[i]), 4) for i in index],
        "accuracy": [round(float(curve.accuracy[i]), 4) for i in index],
        "threshold": [round(float(curve.thresholds[i]), 6) for i in index],
    }


def _section(
    edge_logits: np.ndarray,
    cloud_logits: np.ndarray,
    gold: np.ndarray,
    manifest: Manifest,
    to_group: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracies, signal AUROCs, the operating point and the curve for one labelled set.

    ``to_group`` maps label indices to coarser classes (aisle -> department); ``gold`` is then in that space.
    """
    edge_scored = score(edge_logits, manifest.edge.temperature, manifest.routing.signal)
    edge_pred = edge_scored.label_index
    cloud_pred = cloud_logits.argmax(axis=1)
    if to_group is not None:
        edge_pred, cloud_pred = to_group[edge_pred], to_group[cloud_pred]
    edge_right, cloud_right = edge_pred == gold, cloud_pred == gold
    escalate = edge_scored.signal < manifest.routing.threshold
    cascade_pred = np.where(escalate, cloud_pred, edge_pred)
    cascade_right = cascade_pred == gold
    cloud_acc = share(cloud_right, digits=None)
    curve = cascade_curve(edge_scored.signal, edge_right, cloud_right)
    reachable = np.flatnonzero(curve.accuracy >= QUALITY_FLOOR * cloud_acc - 1e-12)
    aurocs = {s: round(auroc(score(edge_logits, manifest.edge.temperature, s).signal, edge_right), 4) for s in SIGNALS}
    return {
        "rows": len(gold),
        "edge_accuracy": share(edge_right),
        "cloud_accuracy": round(cloud_acc, 4),
        "edge_macro_f1": round(_macro_f1(edge_pred, gold), 4),
        "cloud_macro_f1": round(_macro_f1(cloud_pred, gold), 4),
        "operating_point": {
            "threshold": manifest.routing.threshold,
            "signal": manifest.routing.signal,
            "escalation": share(escalate),
            "cascade_accuracy": share(cascade_right),
            "cascade_macro_f1": round(_macro_f1(cascade_pred, gold), 4),
            "quality_ratio": round(float(cascade_right.mean()) / cloud_acc, 4) if cloud_acc else None,
        },
        "oracle_min_escalation_at_quality_floor": round(float(curve.escalation[reachable[0]]), 4)
        if len(reachable)
        else None,
        "signal_auroc_edge_right": aurocs,
        # 95% percentile bootstrap over the rows (1,000 resamples, seeded): how far each number could move
        # on another draw of rows like these.
        "ci95": bootstrap_ci(
            {
                "edge_accuracy": edge_right,
                "cloud_accuracy": cloud_right,
                "cascade_accuracy": cascade_right,
                "escalation": escalate,
            },
            {"quality_ratio": ("cascade_accuracy", "cloud_accuracy")},
        ),
        "curve": _curve_points(edge_scored.signal, edge_right, cloud_right),
    }


def evaluate(
    model_dir: Path,
    data_dir: Path | None,
    out_dir: Path,
    bigbasket_dir: Path | None = None,
    bigbasket_limit: int | None = None,
    latency_samples: int = 500,
    robustness_rows: int = ROBUSTNESS_ROWS,
) -> dict[str, Any]:
    """Evaluate the model set on its held-out test split (and BigBasket when given); write report.json/.md/.png."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = load_manifest(model_dir)
    catalogue, split = load_split_for_manifest(manifest, data_dir)
    test = catalogue.subset(split.test)
    train = catalogue.subset(split.train)
    edge = EdgeModel.load(model_dir, manifest)
    edge_fp32 = EdgeModel.load(model_dir, manifest, variant="fp32")
    edge_qdq = EdgeModel.load(model_dir, manifest, variant="qdq")
    cloud = CloudModel.load(model_dir, manifest)
    try:
        started = time.perf_counter()
        edge_logits = batched_logits(edge, test.texts)
        fp32_logits = batched_logits(edge_fp32, test.texts)
        qdq_logits = batched_logits(edge_qdq, test.texts)
        cloud_parts = batched_components(cloud, test.texts)
        cloud_logits = cloud_parts["logits"]
        logger.info("scored %d test rows in %.1f s", len(test), time.perf_counter() - started)
        latency = {
            "edge_int8_batch1_ms_with_featurize": batch1_latency_ms(edge, test.texts, latency_samples),
            "edge_fp32_batch1_ms_with_featurize": batch1_latency_ms(edge_fp32, test.texts, latency_samples),
            "cloud_fp32_batch1_ms_with_tokenize": batch1_latency_ms(cloud, test.texts, max(20, latency_samples // 5)),
        }
        parents = manifest.data.get("label_parents") or {label: label for label in manifest.labels}
        groups = sorted(set(parents.values()))
        to_group = np.array([groups.index(parents[label]) for label in manifest.labels])
        report: dict[str, Any] = {
            "model_version": manifest.version,
            "task": manifest.task,
            "data_source": manifest.data["source"],
            "split_sizes": manifest.data.get("sizes"),
            "test": _section(edge_logits, cloud_logits, test.y, manifest),
            "edge_variants_test_accuracy": {
                "int8_served": accuracy(edge_logits, test.y),
                "fp32": accuracy(fp32_logits, test.y),
                "int8_qdq": accuracy(qdq_logits, test.y),
                "int8_vs_fp32_agreement": accuracy(edge_logits, fp32_logits.argmax(1)),
                "served_variant": manifest.edge.metrics.get("served_variant"),
            },
            "latency": latency,
            "sizes_bytes": {
                name: (model_dir / manifest.artifact_files()[role].path).stat().st_size
                for name, role in (
                    ("edge_int8", "edge.onnx"),
                    ("edge_qdq", "edge.qdq_onnx"),
                    ("edge_fp32", "edge.fp32_onnx"),
                    ("cloud_fp32", "cloud.onnx"),
                )
            },
            "routing": {
                "signal": manifest.routing.signal,
                "threshold": manifest.routing.threshold,
                "calibration": manifest.routing.calibration,
            },
            "temperatures": {"edge": manifest.edge.temperature, "cloud": manifest.cloud.temperature},
            "edge_alternatives": manifest.metrics.get("edge_alternatives", []),
            "build_timings_s": manifest.metrics.get("timings_s", {}),
            "cloud_training": manifest.cloud.metrics.get("training", {}),
            "cloud_parts_test_accuracy": {name: accuracy(logits, test.y) for name, logits in cloud_parts.items()},
            "cloud_fusion": manifest.cloud.metrics.get("training", {}).get("fusion"),
            "baseline_tfidf_svm": BASELINE_TFIDF_SVM if manifest.data["source"] == "instacart-products" else None,
        }
        if manifest.task == "aisle":
            report["department_from_aisle"] = _section(edge_logits, cloud_logits, to_group[test.y], manifest, to_group)
        report["robustness"] = robustness(edge, cloud, test.texts, test.y, manifest, robustness_rows)
        report["baseline_same_split"] = _same_split_baseline(
            train.texts, train.y, test.texts, test.y, manifest.task, to_group
        )
        if bigbasket_dir is not None:
            texts, departments = load_bigbasket_departments(Path(bigbasket_dir))
            if bigbasket_limit is not None and bigbasket_limit < len(texts):
                keep = np.sort(np.random.default_rng(0).choice(len(texts), bigbasket_limit, replace=False))
                texts, departments = [texts[i] for i in keep], [departments[i] for i in keep]
            known = [i for i, d in enumerate(departments) if d in groups]
            texts = [texts[i] for i in known]
            gold = np.array([groups.index(departments[i]) for i in known], dtype=np.int64)
            report["bigbasket_departments"] = _section(
                batched_logits(edge, texts), batched_logits(cloud, texts), gold, manifest, to_group
            )
    finally:
        for model in (edge, edge_fp32, edge_qdq, cloud):
            model.close()
    report["targets"] = _targets(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    _plot(report, out_dir / REPORT_PNG)
    logger.info("wrote %s, %s and %s to %s", REPORT_JSON, REPORT_MD, REPORT_PNG, out_dir)
    return report


def _operating(
    edge_logits: np.ndarray, cloud_logits: np.ndarray, gold: np.ndarray, manifest: Manifest
) -> dict[str, Any]:
    """Edge, cloud and cascade accuracy and the escalation share at the manifest's operating point."""
    scored = score(edge_logits, manifest.edge.temperature, manifest.routing.signal)
    escalate = scored.signal < manifest.routing.threshold
    cloud_pred = cloud_logits.argmax(axis=1)
    cascade = np.where(escalate, cloud_pred, scored.label_index)
    return {
        "edge_accuracy": share(scored.label_index == gold),
        "cloud_accuracy": share(cloud_pred == gold),
        "cascade_accuracy": share(cascade == gold),
        "escalation": share(escalate),
    }


@contextlib.contextmanager
def _spelling(edge: EdgeModel, cloud: CloudModel, on: bool) -> Iterator[None]:
    """Both models with their spelling vocabularies (on) or reading rows as they came (off)."""
    kept = edge.spelling, cloud.spelling
    if not on:
        edge.spelling = cloud.spelling = None
    try:
        yield
    finally:
        edge.spelling, cloud.spelling = kept


def robustness(
    edge: EdgeModel,
    cloud: CloudModel,
    texts: list[str],
    gold: np.ndarray,
    manifest: Manifest,
    rows: int = ROBUSTNESS_ROWS,
    seed: int = ROBUSTNESS_SEED,
) -> dict[str, Any]:
    """The served cascade on perturbed copies of (a seeded sample of) the test rows, one family at a time, beside
    the same rows clean: accuracy kept, and how the escalation share moves."""
    from training import augment

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(texts), size=min(rows, len(texts)), replace=False))
    sample, y = [texts[i] for i in pick], gold[pick]
    clean = _operating(batched_logits(edge, sample), batched_logits(cloud, sample), y, manifest)
    families: dict[str, Any] = {}
    runs: list[tuple[str, Callable[[str, random.Random], str], bool]] = [
        ("misspell", augment.misspell, True),
        *((name, family, True) for name, family in augment.FAMILIES.items()),
    ]
    spelling = edge.spelling is not None or cloud.spelling is not None
    if spelling:
        # What the spelling vocabulary is worth: the misspelled rows again, read as they came.
        runs.insert(1, (UNCORRECTED_MISSPELL, augment.misspell, False))
    for name, family, corrected in runs:
        copies = augment.perturbed_copies(sample, family, seed)
        with _spelling(edge, cloud, on=corrected):
            measured = _operating(batched_logits(edge, copies), batched_logits(cloud, copies), y, manifest)
        measured["changed_rows"] = share(np.array([a != b for a, b in zip(sample, copies, strict=True)]))
        measured["cascade_vs_clean"] = (
            round(measured["cascade_accuracy"] / clean["cascade_accuracy"], 4) if clean["cascade_accuracy"] else None
        )
        measured["escalation_change"] = round(measured["escalation"] - clean["escalation"], 4)
        families[name] = measured
    return {
        "rows": len(sample),
        "seed": seed,
        "spelling_correction": spelling,
        "families_described": (augment.__doc__ or "").strip(),
        "clean": clean,
        "families": families,
    }


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    test = report["test"]
    op = test["operating_point"]
    variants = report["edge_variants_test_accuracy"]
    targets: dict[str, Any] = {
        "cascade_quality_ratio_ge_0.99": {
            "value": op["quality_ratio"],
            "met": bool((op["quality_ratio"] or 0) >= QUALITY_FLOOR),
        },
        "cascade_quality_ratio_lower_bound_ge_0.99": {
            "value": test["ci95"].get("quality_ratio", [None])[0],
            "met": bool((test["ci95"].get("quality_ratio", [0.0])[0] or 0) >= QUALITY_FLOOR),
        },
        "escalation_le_0.15": {"value": op["escalation"], "met": bool(op["escalation"] <= MAX_ESCALATION)},
        "edge_int8_loss_le_0.5pt": {
            "value": round(variants["fp32"] - variants["int8_served"], 4),
            "met": bool(variants["fp32"] - variants["int8_served"] <= 0.005),
        },
    }
    misspelled = report.get("robustness", {}).get("families", {}).get("misspell")
    if misspelled is not None:
        targets["misspelled_cascade_ge_0.95_of_clean"] = {
            "value": misspelled["cascade_vs_clean"],
            "met": bool((misspelled["cascade_vs_clean"] or 0) >= ROBUSTNESS_FLOOR),
        }
        targets["misspelled_escalation_rises"] = {
            "value": misspelled["escalation_change"],
            "met": bool(misspelled["escalation_change"] > 0),
        }
    quoted = report.get("baseline_tfidf_svm")
    if quoted and report["task"] in quoted:
        floor = round(quoted[report["task"]] + 0.03, 4)
        targets[f"cloud_ge_quoted_baseline_plus_3pt_{floor}"] = {
            "value": test["cloud_accuracy"],
            "met": bool(test["cloud_accuracy"] >= floor),
        }
    same = report.get("baseline_same_split") or {}
    if report["task"] in same:
        floor = round(same[report["task"]] + 0.03, 4)
        targets[f"cloud_ge_same_split_baseline_plus_3pt_{floor}"] = {
            "value": test["cloud_accuracy"],
            "met": bool(test["cloud_accuracy"] >= floor),
        }
    return targets


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _with_ci(x: float | None, ci: list[float] | None) -> str:
    """A share with its 95% interval, e.g. `77.47% [76.63, 78.31]`."""
    if ci is None:
        return _pct(x)
    return f"{_pct(x)} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _robustness_lines(section: dict[str, Any] | None) -> list[str]:
    """The robustness table: each perturbation family beside the same rows clean."""
    if not section:
        return []
    clean = section["clean"]
    lines = [
        "",
        "## Robustness: queries as shoppers type them",
        "",
        f"{section['rows']} test rows (seeded sample, seed {section['seed']}); each family perturbs every row once. "
        f"Clean, the same rows: cascade {_pct(clean['cascade_accuracy'])} at {_pct(clean['escalation'])} "
        "escalation."
        + (
            " Both tiers read queries through the build's spelling vocabulary (tiergate.spelling: a word not in "
            "the training rows, one edit from one that is, is read as the most frequent such word); "
            f"'{UNCORRECTED_MISSPELL}' is the misspelled rows with that turned off."
            if section.get("spelling_correction")
            else ""
        ),
        "",
        "| family | rows changed | edge | cloud | cascade | cascade / clean | escalation | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in section["families"].items():
        lines.append(
            f"| {name} | {_pct(m['changed_rows'])} | {_pct(m['edge_accuracy'])} | {_pct(m['cloud_accuracy'])} | "
            f"{_pct(m['cascade_accuracy'])} | {m['cascade_vs_clean']} | {_pct(m['escalation'])} | "
            f"{100 * m['escalation_change']:+.2f} pt |"
        )
    lines += ["", "Families:", "", *[f"    {line}" for line in section["families_described"].splitlines()]]
    return lines


def _bounds(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.4f}, {ci[1]:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of ``report``."""
    lines = [
        f"# Tiergate evaluation: {report['task']} task, model {report['model_version']}",
        "",
        f"Data: {report['data_source']}; split sizes {report['split_sizes']} (grouped by normalised name). "
        "All numbers on the held-out test split unless marked; "
        "models run through EdgeModel/CloudModel (ONNX Runtime, CPU). Brackets: 95% bootstrap intervals over "
        "the rows (1,000 resamples).",
        "",
        "| set | rows | edge INT8 | cloud FP32 | cascade | escalation | cascade / cloud "
        "| min escalation for 0.99x cloud (oracle) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sections = [
        ("Instacart test", "test"),
        ("department (from aisle)", "department_from_aisle"),
        ("BigBasket (mapped departments)", "bigbasket_departments"),
    ]
    for title, key in sections:
        if key not in report:
            continue
        s = report[key]
        op = s["operating_point"]
        ci = s.get("ci95", {})
        lines.append(
            f"| {title} | {s['rows']} | {_with_ci(s['edge_accuracy'], ci.get('edge_accuracy'))} | "
            f"{_with_ci(s['cloud_accuracy'], ci.get('cloud_accuracy'))} | "
            f"{_with_ci(op['cascade_accuracy'], ci.get('cascade_accuracy'))} | "
            f"{_with_ci(op['escalation'], ci.get('escalation'))} | "
            f"{op['quality_ratio']} [{_bounds(ci.get('quality_ratio'))}] | "
            f"{_pct(s['oracle_min_escalation_at_quality_floor'])} |"
        )
    v = report["edge_variants_test_accuracy"]
    lat = report["latency"]
    edge_int8 = lat["edge_int8_batch1_ms_with_featurize"]
    edge_fp32 = lat["edge_fp32_batch1_ms_with_featurize"]
    cloud_fp32 = lat["cloud_fp32_batch1_ms_with_tokenize"]
    sizes = report["sizes_bytes"]
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *[f"| {name} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for name, t in report["targets"].items()],
        "",
        "## Edge model",
        "",
        f"- Served INT8 form: {v['served_variant']}; "
        f"test accuracy INT8 {_pct(v['int8_served'])}, FP32 {_pct(v['fp32'])}, "
        f"QDQ INT8 {_pct(v['int8_qdq'])}; INT8/FP32 agreement {_pct(v['int8_vs_fp32_agreement'])}.",
        f"- Sizes: INT8 {sizes['edge_int8'] / 2**20:.2f} MiB, QDQ {sizes['edge_qdq'] / 2**20:.2f} MiB, "
        f"FP32 {sizes['edge_fp32'] / 2**20:.2f} MiB; cloud FP32 {sizes['cloud_fp32'] / 2**20:.1f} MiB.",
        f"- Batch-1 latency with preprocessing (p50 / p99): edge INT8 {edge_int8['p50']:.3f} / "
        f"{edge_int8['p99']:.3f} ms; edge FP32 {edge_fp32['p50']:.3f} / "
        f"{edge_fp32['p99']:.3f} ms; cloud FP32 {cloud_fp32['p50']:.2f} / "
        f"{cloud_fp32['p99']:.2f} ms (1 intra-op thread).",
        "",
        '## Escalation signal (AUROC of "edge is right", test split)',
        "",
        "| signal | AUROC |",
        "|---|---|",
        *[
            f"| {s}{' (used)' if s == report['routing']['signal'] else ''} | {a} |"
            for s, a in report["test"]["signal_auroc_edge_right"].items()
        ],
        "",
        f"Routing: escalate when {report['routing']['signal']} < {report['routing']['threshold']:.4f}; "
        f"calibrated on validation: {json.dumps(report['routing']['calibration'].get('target'))}, "
        f"achieved escalation {report['routing']['calibration'].get('achieved_escalation')} on "
        f"{report['routing']['calibration'].get('rows')} validation rows. "
        f"Temperatures: edge {report['temperatures']['edge']:.3f}, "
        f"cloud {report['temperatures']['cloud']:.3f}.",
    ]
    if report["edge_alternatives"]:
        lines += [
            "",
            "## Edge architectures tried (validation split)",
            "",
            "| candidate | served INT8 form | val acc FP32 | val acc INT8 | INT8 MiB | batch-1 p50 ms "
            "| escalation at 0.99x cloud | within bounds | chosen |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for alt in report["edge_alternatives"]:
            accs = alt["validation_accuracy"]
            lines.append(
                f"| {alt['name']} | {alt['served_variant']} | {_pct(accs.get('fp32'))} "
                f"| {_pct(accs.get(alt['served_variant']))} | "
                f"{alt['int8_bytes'] / 2**20:.2f} | {alt['batch1_latency_ms_p50']:.3f} "
                f"| {_pct(alt['escalation_at_quality_floor'])} | "
                f"{alt['within_bounds']} | {'yes' if alt['chosen'] else ''} |"
            )
    parts = report.get("cloud_parts_test_accuracy") or {}
    if len(parts) > 1:
        lines += [
            "",
            "## Cloud model parts (test split, same ONNX graph)",
            "",
            "| part | accuracy |",
            "|---|---|",
            *[f"| {name} | {_pct(acc)} |" for name, acc in parts.items()],
            "",
            f"Fusion (fitted on validation): {json.dumps(report.get('cloud_fusion'))}; "
            "logits = alpha * log_softmax(deep) + (1 - alpha) * log_softmax(gamma * lexical).",
        ]
    same = report.get("baseline_same_split") or {}
    lines += _robustness_lines(report.get("robustness"))
    lines += ["", "## Baseline", ""]
    if same:
        lines.append(
            f"- Measured on this split: {same['model']}: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in same.items() if k in ("aisle", "department"))
            + "."
        )
    if report.get("baseline_tfidf_svm"):
        lines.append(f"- Quoted from SOURCE.md (80/20 split): TF-IDF + LinearSVC {report['baseline_tfidf_svm']}.")
    timings = report.get("build_timings_s") or {}
    if timings:
        training = {
            k: report["cloud_training"].get(k) for k in ("train_seconds", "best_epoch", "history", "torch_threads")
        }
        lines += [
            "",
            f"Build timings (s, this machine): {json.dumps(timings)}; cloud training: {json.dumps(training)}.",
        ]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against escalation rate: edge-only, cloud-only, the cascade and the operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("test", "department_from_aisle", "bigbasket_departments") if k in report]
    titles = {
        "test": f"Instacart {report['task']} (test)",
        "department_from_aisle": "Instacart department (from aisle)",
        "bigbasket_departments": "BigBasket, mapped departments",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        s = report[key]
        op = s["operating_point"]
        ax.plot(s["curve"]["escalation"], s["curve"]["accuracy"], label="cascade (all thresholds)", color="tab:blue")
        ax.axhline(s["edge_accuracy"], color="tab:orange", linestyle=":", label=f"edge only {s['edge_accuracy']:.3f}")
        ax.axhline(
            s["cloud_accuracy"], color="tab:green", linestyle="--", label=f"cloud only {s['cloud_accuracy']:.3f}"
        )
        ax.axhline(
            QUALITY_FLOOR * s["cloud_accuracy"], color="grey", linestyle="-.", linewidth=0.8, label="0.99 x cloud"
        )
        ax.scatter(
            [op["escalation"]],
            [op["cascade_accuracy"]],
            color="red",
            zorder=5,
            label=f"operating point ({op['escalation']:.1%}, {op['cascade_accuracy']:.3f})",
        )
        ax.set_title(titles[key])
        ax.set_xlabel("escalation rate")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
