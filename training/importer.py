"""`tiergate models import`: a versioned repository entry from the user's own ONNX pair.

Everything is checked before anything is written: the declared input against each graph's inputs (names,
types, fixed dimensions), each graph's output against the labels and what it is said to hold, and one run of
each graph (and of the quantized edge file) on two rows. The new version is assembled in a scratch directory
and moved into `REPOSITORY/NAME/<next number>` in one rename, so a reader never sees half of it.

Its routing is a placeholder until `tiergate calibrate NAME --data FILE` picks the threshold on the user's
labelled data.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiergate.features import HashedNgramFeaturizer
from tiergate.inputs import Row, Vector, make_feeds
from tiergate.manifest import (
    FORMAT_VERSION,
    SCORES,
    ArtifactFile,
    CloudSpec,
    EdgeSpec,
    InputSpec,
    Manifest,
    ManifestError,
    OutputSpec,
    RoutingSpec,
    UpstreamSpec,
    artifact,
    check_manifest,
    load_manifest,
    numbered_versions,
    write_manifest,
)
from tiergate.onnx_session import cpu_session
from tiergate.scoring import SIGNALS, as_logits, score

logger = logging.getLogger(__name__)

QUANTIZE = ("dynamic", "qdq")
# The routing of a model not yet calibrated: escalate answers whose top probability is under one half.
PLACEHOLDER_SIGNAL, PLACEHOLDER_THRESHOLD = "max_prob", 0.5
_TENSOR = re.compile(r"tensor:(FP32|INT64):\[\s*(-1(?:\s*,\s*[0-9]+)+)\s*\]")
_SAMPLE_TEXTS = ("organic whole milk 1 gal", "sparkling water lime 12 pack")
# The graph input types each tensor datatype may feed.
_GRAPH_TYPES = {"FP32": ("tensor(float)",), "INT64": ("tensor(int64)",)}


class ImportRefused(ValueError):
    """The files do not match what was declared; the message says what, and nothing was written."""


@dataclass(frozen=True)
class InputDeclaration:
    """`--input`: what callers send and how both tiers' graphs are fed."""

    spec: InputSpec
    preprocess: str  # ngrams, tokenizer or tensor
    tokenizer: Path | None = None


def parse_input(value: str, name: str | None = None) -> InputDeclaration:
    """`text:ngrams`, `text:tokenizer=FILE` or `tensor:FP32:[-1,D]` (INT64 too; more fixed dimensions allowed)."""
    if value == "text:ngrams":
        return InputDeclaration(InputSpec(name or "text", "BYTES", [-1]), "ngrams")
    if value.startswith("text:tokenizer="):
        path = Path(value.removeprefix("text:tokenizer="))
        if not path.is_file():
            raise ImportRefused(f"--input {value}: tokenizer file {path} does not exist")
        return InputDeclaration(InputSpec(name or "text", "BYTES", [-1]), "tokenizer", path)
    match = _TENSOR.fullmatch(value.replace(" ", ""))
    if match is None:
        raise ImportRefused(
            f"--input {value!r} is not one of text:ngrams, text:tokenizer=FILE, tensor:FP32:[-1,D], tensor:INT64:[-1,D]"
        )
    shape = [int(dim) for dim in match.group(2).split(",")]
    if any(dim < 1 for dim in shape[1:]):
        raise ImportRefused(f"--input {value!r}: every dimension but the first (-1, the batch) must be positive")
    return InputDeclaration(InputSpec(name or "input", match.group(1), shape), "tensor")


def read_labels(path: Path) -> list[str]:
    """One label per line (blank lines skipped), in the order of the graphs' output columns."""
    try:
        labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ImportRefused(f"cannot read the labels file {path}: {error}") from None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ImportRefused(f"{path} must list at least two distinct labels, one per line; it has {labels}")
    return labels


def _sample_rows(declaration: InputDeclaration) -> list[Row]:
    spec = declaration.spec
    if spec.text:
        return list(_SAMPLE_TEXTS)
    dtype = np.float32 if spec.datatype == "FP32" else np.int64
    return [Vector(np.full(spec.row_shape, value, dtype=dtype)) for value in (0, 1)]


def _dims(shape: Any) -> list[int | None]:
    return [dim if isinstance(dim, int) else None for dim in shape]


@dataclass(frozen=True)
class _GraphCheck:
    tier: str
    path: Path
    scores: str
    output_name: str


def check_graph(
    check: _GraphCheck, declaration: InputDeclaration, labels: list[str], featurizer: dict[str, Any] | None
) -> None:
    """ImportRefused naming the file and what does not fit: inputs, output shape, or a run on two rows."""
    where = f"{check.tier} model {check.path.name}"
    try:
        session = cpu_session(check.path, 1, f"{check.tier} ONNX")
    except Exception as error:  # a file ONNX Runtime cannot load: said as it is
        raise ImportRefused(f"{where} does not load in ONNX Runtime: {error}") from None
    inputs = {i.name: i.type for i in session.get_inputs()}
    outputs = {o.name: _dims(o.shape) for o in session.get_outputs()}
    if check.output_name and check.output_name not in outputs:
        raise ImportRefused(f"{where} has no output {check.output_name!r}; its outputs are {sorted(outputs)}")
    output = check.output_name or next(iter(outputs))
    spec = declaration.spec
    if declaration.preprocess == "tensor":
        graph_input = session.get_inputs()[0] if len(inputs) == 1 else None
        if graph_input is None:
            raise ImportRefused(f"{where} takes inputs {sorted(inputs)}; a tensor model's graph takes exactly one")
        if graph_input.type not in _GRAPH_TYPES[spec.datatype]:
            raise ImportRefused(
                f"{where} input {graph_input.name!r} is {graph_input.type}; the declared input {spec.describe()} "
                f"needs {' or '.join(_GRAPH_TYPES[spec.datatype])}"
            )
        dims = _dims(graph_input.shape)
        fixed = [(want, got) for want, got in zip(spec.shape[1:], dims[1:], strict=False) if got is not None]
        if len(dims) != len(spec.shape) or any(want != got for want, got in fixed):
            raise ImportRefused(
                f"{where} input {graph_input.name!r} has shape {[d if d is not None else -1 for d in dims]}; "
                f"the declared input is {spec.describe()}"
            )
    try:
        feeds = make_feeds(
            declaration.preprocess,
            inputs,
            featurizer=featurizer,
            tokenizer_path=declaration.tokenizer,
            max_length=tokenizer_max_length(declaration),
        )
        rows = _sample_rows(declaration)
        (raw,) = session.run([output], feeds(rows))
        logits = as_logits(np.asarray(raw), check.scores, len(labels))
    except ImportRefused:
        raise
    except ValueError as error:
        raise ImportRefused(f"{where} output {output!r} ({check.scores}): {error}") from None
    except Exception as error:  # a graph that fails on two plain rows
        raise ImportRefused(f"{where} fails on two sample rows of {spec.describe()}: {error}") from None
    if logits.shape != (len(rows), len(labels)):
        raise ImportRefused(f"{where} answered shape {list(logits.shape)} for {len(rows)} rows")


# The tokenizer's truncation length of an imported text model.
DEFAULT_MAX_LENGTH = 64


def tokenizer_max_length(declaration: InputDeclaration) -> int:
    return DEFAULT_MAX_LENGTH if declaration.preprocess == "tokenizer" else 0


def _next_version(model_root: Path) -> int:
    if not model_root.exists():
        return 1
    try:
        versions = numbered_versions(model_root)
    except ManifestError as error:
        raise ImportRefused(str(error)) from None
    if versions is None:
        raise ImportRefused(f"{model_root} holds one built model, not numbered versions; import under another name")
    return (versions[-1][0] + 1) if versions else 1


def _quantize(
    method: str,
    fp32: Path,
    out: Path,
    declaration: InputDeclaration,
    calibration: Path | None,
    featurizer: dict[str, Any] | None,
) -> None:
    from training.quantize import quantize_dynamic_int8, quantize_qdq_feeds

    if method == "dynamic":
        quantize_dynamic_int8(fp32, out)
        return
    if calibration is None:
        raise ImportRefused("--quantize qdq needs --calibration FILE (rows of the input, as `calibrate --data` reads)")
    rows, _ = read_rows(calibration, declaration.spec)
    session = cpu_session(fp32, 1, "edge ONNX")
    feeds = make_feeds(
        declaration.preprocess,
        {i.name: i.type for i in session.get_inputs()},
        featurizer=featurizer,
        tokenizer_path=declaration.tokenizer,
        max_length=tokenizer_max_length(declaration),
    )
    batches = [feeds(rows[i : i + 64]) for i in range(0, len(rows), 64)]
    quantize_qdq_feeds(fp32, out, batches)


def import_model(
    repository: Path,
    name: str,
    *,
    edge: Path,
    cloud: Path | None,
    labels_file: Path,
    input_value: str,
    input_name: str | None = None,
    quantize: str | None = None,
    calibration: Path | None = None,
    positive_label: str | None = None,
    edge_scores: str = "logits",
    cloud_scores: str = "logits",
    edge_output: str = "",
    cloud_output: str = "",
    upstream: UpstreamSpec | None = None,
) -> tuple[int, Path]:
    """Check the files against the declaration, then add them as the next version of `name` under
    `repository`; returns (version number, its directory). ImportRefused, with nothing written, when they do
    not match."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or name.isdigit():
        raise ImportRefused(f"model name {name!r} must be letters, digits, '.', '_' or '-', and not a number")
    for path, what in ((edge, "--edge"), (cloud, "--cloud")):
        if path is not None and not Path(path).is_file():
            raise ImportRefused(f"{what} file {path} does not exist")
    if cloud is None and upstream is None:
        raise ImportRefused("give --cloud FILE, or --upstream-model NAME for a cloud tier that relays upstream")
    for scores in (edge_scores, cloud_scores):
        if scores not in SCORES:
            raise ImportRefused(f"scores must be one of {', '.join(SCORES)}; got {scores!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ImportRefused(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    declaration = parse_input(input_value, input_name)
    labels = read_labels(labels_file)
    output = OutputSpec()
    if positive_label is not None:
        if len(labels) != 2 or labels[1] != positive_label:
            raise ImportRefused(
                f"a binary model lists two labels, the negative one first and the positive one ({positive_label!r}) "
                f"second; {labels_file} lists {labels}"
            )
        output = OutputSpec(kind="binary", positive_label=positive_label)
    elif "probability" in (edge_scores, cloud_scores):
        raise ImportRefused("a graph answering one probability is a binary model: give --positive-label")
    featurizer = HashedNgramFeaturizer().config() if declaration.preprocess == "ngrams" else None
    check_graph(_GraphCheck("edge", Path(edge), edge_scores, edge_output), declaration, labels, featurizer)
    if cloud is not None:
        check_graph(_GraphCheck("cloud", Path(cloud), cloud_scores, cloud_output), declaration, labels, featurizer)

    model_root = Path(repository) / name
    number = _next_version(model_root)
    model_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=model_root))
    try:
        (scratch / "edge").mkdir()
        fp32_path = scratch / "edge" / "edge_fp32.onnx"
        shutil.copyfile(edge, fp32_path)
        served = fp32_path
        qdq: ArtifactFile | None = None
        if quantize is not None:
            served = scratch / "edge" / ("edge_int8_qdq.onnx" if quantize == "qdq" else "edge_int8.onnx")
            _quantize(quantize, fp32_path, served, declaration, calibration, featurizer)
            check_graph(
                _GraphCheck("quantized edge", served, edge_scores, edge_output), declaration, labels, featurizer
            )
            if quantize == "qdq":
                qdq = artifact(scratch, served)
        tokenizer = None
        if declaration.tokenizer is not None:
            shutil.copyfile(declaration.tokenizer, scratch / "tokenizer.json")
            tokenizer = artifact(scratch, scratch / "tokenizer.json")
        cloud_file = None
        if cloud is not None:
            (scratch / "cloud").mkdir()
            shutil.copyfile(cloud, scratch / "cloud" / "cloud.onnx")
            cloud_file = artifact(scratch, scratch / "cloud" / "cloud.onnx")
        created = dt.datetime.now(dt.UTC).replace(microsecond=0)
        max_length = tokenizer_max_length(declaration)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            version=created.strftime("%Y%m%dT%H%M%SZ"),
            created_at=created.isoformat(),
            task=name,
            data={
                "source": "imported",
                "files": {"edge": Path(edge).name, "cloud": None if cloud is None else Path(cloud).name},
                "quantize": quantize,
            },
            labels=labels,
            edge=EdgeSpec(
                onnx=artifact(scratch, served),
                qdq_onnx=qdq,
                fp32_onnx=artifact(scratch, fp32_path) if quantize is not None else None,
                featurizer=featurizer,
                temperature=1.0,
                tokenizer=tokenizer,
                max_length=max_length,
                scores=edge_scores,
                output_name=edge_output,
            ),
            cloud=CloudSpec(
                onnx=cloud_file,
                tokenizer=tokenizer,
                max_length=max_length,
                temperature=1.0,
                featurizer=featurizer,
                scores=cloud_scores,
                output_name=cloud_output,
                upstream=upstream,
            ),
            routing=RoutingSpec(
                signal=PLACEHOLDER_SIGNAL,
                threshold=PLACEHOLDER_THRESHOLD,
                calibration={"calibrated": False, "note": "run `tiergate calibrate NAME --data FILE`"},
            ),
            inputs=[declaration.spec],
            output=output,
        )
        check_manifest(manifest)
        write_manifest(scratch, manifest)
        target = model_root / str(number)
        os.rename(scratch, target)  # one step: a reader sees the whole version or none of it
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("imported %s version %d into %s", name, number, target)
    return number, target


def read_rows(path: Path, spec: InputSpec) -> tuple[list[Row], list[str] | np.ndarray | None]:
    """Labelled (or not) rows from a file: CSV with columns `text` and `label` for a text input; `.npz` with the
    input's array under its name or `x` (and labels under `y`, as strings or label indices) for a tensor input."""
    path = Path(path)
    if spec.text:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or "text" not in reader.fieldnames:
                    raise ImportRefused(f"{path} must be CSV with a header naming columns text (and label)")
                records = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ImportRefused(f"cannot read {path}: {error}") from None
        texts: list[Row] = [record["text"] for record in records if (record.get("text") or "").strip()]
        has_labels = records and "label" in records[0]
        labels = [record["label"] for record in records if (record.get("text") or "").strip()] if has_labels else None
        return texts, labels
    try:
        with np.load(path, allow_pickle=False) as data:
            key = spec.name if spec.name in data.files else "x"
            if key not in data.files:
                raise ImportRefused(f"{path} holds {data.files}; the rows go under {spec.name!r} or 'x'")
            x = np.asarray(data[key])
            y = np.asarray(data["y"]) if "y" in data.files else None
    except (OSError, ValueError) as error:
        raise ImportRefused(f"cannot read {path} as .npz: {error}") from None
    if x.ndim != len(spec.shape) or tuple(x.shape[1:]) != spec.row_shape:
        raise ImportRefused(f"{path}: rows of shape {list(x.shape)} do not fit input {spec.describe()}")
    dtype = np.float32 if spec.datatype == "FP32" else np.int64
    return [Vector(row) for row in x.astype(dtype)], y


def label_indices(labels: list[str], y: list[str] | np.ndarray | None, where: Path) -> np.ndarray:
    """The label column as indices into `labels` (strings are looked up; integers are taken as indices)."""
    if y is None:
        raise ImportRefused(f"{where} has no labels (a `label` column, or `y` in the .npz)")
    values = np.asarray(y)
    if values.dtype.kind in "iu":
        if values.size and (values.min() < 0 or values.max() >= len(labels)):
            raise ImportRefused(f"{where}: label indices must be within 0..{len(labels) - 1}")
        return values.astype(np.int64)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ImportRefused(f"{where}: labels {unknown[:5]} are not among the model's labels {labels}")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def calibrate_on_data(
    version_dir: Path,
    data: Path,
    *,
    target_escalation: float | None = None,
    target_quality: float | None = None,
) -> RoutingSpec:
    """Fit both tiers' temperatures on the user's labelled rows, pick the routing signal that best tells the
    edge's right answers from its wrong ones, and the threshold for the target; written into the version's
    manifest (a version already serving takes it at its next load or restart)."""
    from cloud_runtime.model import CloudModel
    from edge_runtime.model import EdgeModel
    from training.calibrate import fit_temperature, routing_from_predictions, signal_aurocs
    from training.measure import batched_logits

    manifest = load_manifest(version_dir)
    if manifest.cloud.onnx is None:
        raise ImportRefused("calibration runs both tiers here; this model's cloud relays upstream and has no ONNX")
    rows, y_raw = read_rows(data, manifest.input)
    y = label_indices(manifest.labels, y_raw, data)
    if len(rows) < 20:
        raise ImportRefused(f"{data} holds {len(rows)} labelled rows; calibration needs at least 20")
    edge = EdgeModel.load(version_dir, manifest)
    cloud = CloudModel.load(version_dir, manifest)
    try:
        edge_logits, cloud_logits = batched_logits(edge, rows), batched_logits(cloud, rows)
    finally:
        edge.close()
        cloud.close()
    edge_t, cloud_t = fit_temperature(edge_logits, y), fit_temperature(cloud_logits, y)
    aurocs = signal_aurocs(edge_logits, edge_t, y)
    # The signal that best separates the edge's right answers from its wrong ones (max_prob on a tie).
    signal = max(SIGNALS, key=lambda name: (np.nan_to_num(aurocs.get(name, 0.0)), name == "max_prob"))

    edge_scored = score(edge_logits, edge_t, signal)
    cloud_labels = cloud_logits.argmax(1)
    routing = routing_from_predictions(
        signal,
        edge_scored.signal,
        edge_scored.label_index == y,
        cloud_labels == y,
        target_escalation=target_escalation,
        target_quality=target_quality,
        agreement=edge_scored.label_index == cloud_labels,
        extra={"signal_auroc": {k: round(v, 4) for k, v in aurocs.items()}, "data": Path(data).name},
    )
    routing = dataclasses.replace(
        routing,
        calibration={**routing.calibration, "split": "user data"},
        max_edge_tokens=manifest.routing.max_edge_tokens,
        max_edge_batch=manifest.routing.max_edge_batch,
    )
    updated = dataclasses.replace(
        manifest,
        edge=dataclasses.replace(manifest.edge, temperature=float(edge_t)),
        cloud=dataclasses.replace(manifest.cloud, temperature=float(cloud_t)),
        routing=routing,
    )
    write_manifest(version_dir, updated)
    return routing
