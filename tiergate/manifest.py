"""The model manifest: what a model takes and answers, which artifact files make up each tier, their checksums,
and how rows are routed between the tiers.

Format 2 declares the model's wire contract (`inputs`: one text input, or one numeric tensor; `output`: class
labels, or one probability for a binary model) and, per tier, how its ONNX file is fed (`preprocess`: hashed
n-grams, a `tokenizers` tokenizer, or the tensor as it came) and what it answers (`scores`: logits,
probabilities, or one probability). A text model may name a spelling vocabulary (`spelling`, tiergate.spelling)
that both tiers read queries through. Format 1 manifests (the built-in text task) read as format 2 with those
fields at their built-in values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
# Format 3 is format 2 plus `spelling`. A manifest naming a vocabulary is written as 3, so that an older reader,
# which would ignore the field and serve the model uncorrected, refuses it instead.
SPELLING_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)

# The OIP datatypes an input may have: BYTES is a text per row; the others are numeric tensors.
INPUT_DATATYPES = ("BYTES", "FP32", "INT64")
# What a tier's ONNX output holds: logits [n, K], probabilities [n, K], or one probability [n] or [n, 1] (that of
# a binary model's positive label).
SCORES = ("logits", "probabilities", "probability")
OUTPUT_KINDS = ("classes", "binary")


class ManifestError(ValueError):
    """The model directory or its manifest is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class ArtifactFile:
    """One file of the model set, relative to the model directory, with its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class InputSpec:
    """The model's input as callers send it: its name, OIP datatype and shape (-1 for the batch dimension)."""

    name: str
    datatype: str
    shape: list[int]

    @property
    def text(self) -> bool:
        return self.datatype == "BYTES"

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row (the shape without its batch dimension)."""
        return tuple(self.shape[1:])

    def describe(self) -> str:
        """How error messages name it, e.g. `'features' (FP32, shape [-1, 8])`."""
        return f"{self.name!r} ({self.datatype}, shape {list(self.shape)})"


TEXT_INPUT = InputSpec(name="text", datatype="BYTES", shape=[-1])


@dataclass(frozen=True)
class OutputSpec:
    """What the model answers: one of its class labels, or (binary) its positive label or the other one; the
    tiers of a binary model give the positive label's probability."""

    kind: str = "classes"
    positive_label: str = ""


@dataclass(frozen=True)
class EdgeSpec:
    """The edge tier: the served ONNX file (INT8 for the built-in task), its QDQ and FP32 siblings where the
    build made them, and how it is fed: the hashed n-gram `featurizer`, a `tokenizer`, or the tensor as sent."""

    onnx: ArtifactFile
    qdq_onnx: ArtifactFile | None
    fp32_onnx: ArtifactFile | None
    featurizer: dict[str, Any] | None
    temperature: float
    metrics: dict[str, Any] = field(default_factory=dict)
    tokenizer: ArtifactFile | None = None
    max_length: int = 0
    scores: str = "logits"
    # The ONNX output read ("" : the graph's first output).
    output_name: str = ""

    @property
    def preprocess(self) -> str:
        return _preprocess(self.featurizer, self.tokenizer)


@dataclass(frozen=True)
class UpstreamSpec:
    """An existing OIP v2 server the cloud tier relays to (`serve cloud --upstream`): the model it serves there,
    the output read ("": the first) and what that output holds."""

    model_name: str = ""
    model_version: str = ""
    output_name: str = ""
    scores: str = "logits"


@dataclass(frozen=True)
class CloudSpec:
    """The cloud tier: its ONNX classifier, fed by a ``tokenizers`` tokenizer.json (with, when the graph has a
    lexical branch, the hashed n-gram featurizer that feeds it), by hashed n-grams alone, or by the tensor as
    sent; or none, when the cloud relays to an upstream OIP server (`upstream`)."""

    onnx: ArtifactFile | None
    tokenizer: ArtifactFile | None
    max_length: int
    temperature: float
    metrics: dict[str, Any] = field(default_factory=dict)
    featurizer: dict[str, Any] | None = None
    scores: str = "logits"
    output_name: str = ""
    upstream: UpstreamSpec | None = None

    @property
    def preprocess(self) -> str:
        return _preprocess(self.featurizer, self.tokenizer)


def _preprocess(featurizer: dict[str, Any] | None, tokenizer: ArtifactFile | None) -> str:
    if tokenizer is not None:
        return "tokenizer"
    return "ngrams" if featurizer is not None else "tensor"


@dataclass(frozen=True)
class RoutingSpec:
    """The escalation rule: escalate when the edge's ``signal`` confidence is below ``threshold``; and, when set,
    this model's own heavy-request rules (rows longer than ``max_edge_tokens`` words, requests of more than
    ``max_edge_batch`` rows go straight to the last tier; unset: the gateway's settings)."""

    signal: str
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)
    max_edge_tokens: int | None = None
    max_edge_batch: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to load and route a model set."""

    format_version: int
    version: str
    created_at: str
    task: str
    data: dict[str, Any]
    labels: list[str]
    edge: EdgeSpec
    cloud: CloudSpec
    routing: RoutingSpec
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputSpec] = field(default_factory=lambda: [TEXT_INPUT])
    output: OutputSpec = field(default_factory=OutputSpec)
    # Text models: the vocabulary both tiers correct query spelling with (tiergate.spelling); None: no correction.
    spelling: ArtifactFile | None = None

    @property
    def input(self) -> InputSpec:
        """The one input (a model takes one text or one tensor)."""
        return self.inputs[0]

    def artifact_files(self) -> dict[str, ArtifactFile]:
        """Every file the manifest names, keyed by its role."""
        files = {
            "edge.onnx": self.edge.onnx,
            "edge.qdq_onnx": self.edge.qdq_onnx,
            "edge.fp32_onnx": self.edge.fp32_onnx,
            "edge.tokenizer": self.edge.tokenizer,
            "cloud.onnx": self.cloud.onnx,
            "cloud.tokenizer": self.cloud.tokenizer,
            "spelling": self.spelling,
        }
        return {role: item for role, item in files.items() if item is not None}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact(model_dir: Path, path: Path) -> ArtifactFile:
    """An ArtifactFile for ``path`` (inside ``model_dir``) with its current checksum."""
    relative = Path(path).resolve().relative_to(Path(model_dir).resolve())
    return ArtifactFile(path=relative.as_posix(), sha256=file_sha256(path))


def _artifact_from_dict(raw: Any, where: str) -> ArtifactFile:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not isinstance(raw.get("sha256"), str):
        raise ManifestError(f"manifest field {where} must be an object with string 'path' and 'sha256'")
    return ArtifactFile(path=raw["path"], sha256=raw["sha256"])


def _optional_artifact(raw: dict[str, Any], key: str, where: str) -> ArtifactFile | None:
    return None if raw.get(key) is None else _artifact_from_dict(raw[key], where)


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ManifestError(f"manifest field {where} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _inputs(raw: Any) -> list[InputSpec]:
    if not isinstance(raw, list) or len(raw) != 1:
        raise ManifestError("manifest field inputs must list exactly one input (one text, or one tensor)")
    entry = raw[0]
    datatype = _choice(entry.get("datatype"), INPUT_DATATYPES, "inputs[0].datatype")
    shape = [int(dim) for dim in entry["shape"]]
    if not shape or shape[0] != -1 or any(dim < 1 for dim in shape[1:]):
        raise ManifestError(f"manifest field inputs[0].shape must be [-1, ...] with fixed row dimensions; got {shape}")
    if datatype == "BYTES" and shape != [-1]:
        raise ManifestError(f"a text input (BYTES) has shape [-1], one text per row; got {shape}")
    return [InputSpec(name=str(entry["name"]), datatype=datatype, shape=shape)]


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Parse a manifest from its JSON object, raising ManifestError on a malformed one."""
    try:
        version = int(raw["format_version"])
        if version not in READABLE_FORMATS:
            raise ManifestError(
                f"manifest format_version {version} is not supported (expected one of "
                f"{', '.join(map(str, READABLE_FORMATS))}); rebuild the models with `tiergate models build`"
            )
        edge, cloud, routing = raw["edge"], raw["cloud"], raw["routing"]
        upstream = cloud.get("upstream")
        output = raw.get("output") or {"kind": "classes"}
        manifest = Manifest(
            format_version=version,
            version=str(raw["version"]),
            created_at=str(raw["created_at"]),
            task=str(raw["task"]),
            data=dict(raw["data"]),
            labels=[str(label) for label in raw["labels"]],
            edge=EdgeSpec(
                onnx=_artifact_from_dict(edge["onnx"], "edge.onnx"),
                qdq_onnx=_optional_artifact(edge, "qdq_onnx", "edge.qdq_onnx"),
                fp32_onnx=_optional_artifact(edge, "fp32_onnx", "edge.fp32_onnx"),
                featurizer=dict(edge["featurizer"]) if edge.get("featurizer") is not None else None,
                temperature=float(edge["temperature"]),
                metrics=dict(edge.get("metrics", {})),
                tokenizer=_optional_artifact(edge, "tokenizer", "edge.tokenizer"),
                max_length=int(edge.get("max_length", 0)),
                scores=_choice(edge.get("scores", "logits"), SCORES, "edge.scores"),
                output_name=str(edge.get("output_name", "")),
            ),
            cloud=CloudSpec(
                onnx=_optional_artifact(cloud, "onnx", "cloud.onnx"),
                tokenizer=_optional_artifact(cloud, "tokenizer", "cloud.tokenizer"),
                max_length=int(cloud.get("max_length", 0)),
                temperature=float(cloud["temperature"]),
                metrics=dict(cloud.get("metrics", {})),
                featurizer=dict(cloud["featurizer"]) if cloud.get("featurizer") is not None else None,
                scores=_choice(cloud.get("scores", "logits"), SCORES, "cloud.scores"),
                output_name=str(cloud.get("output_name", "")),
                upstream=None
                if upstream is None
                else UpstreamSpec(
                    model_name=str(upstream.get("model_name", "")),
                    model_version=str(upstream.get("model_version", "")),
                    output_name=str(upstream.get("output_name", "")),
                    scores=_choice(upstream.get("scores", "logits"), SCORES, "cloud.upstream.scores"),
                ),
            ),
            routing=RoutingSpec(
                signal=str(routing["signal"]),
                threshold=float(routing["threshold"]),
                calibration=dict(routing.get("calibration", {})),
                max_edge_tokens=_optional_int(routing.get("max_edge_tokens")),
                max_edge_batch=_optional_int(routing.get("max_edge_batch")),
            ),
            metrics=dict(raw.get("metrics", {})),
            inputs=_inputs(raw["inputs"]) if "inputs" in raw else [TEXT_INPUT],
            output=OutputSpec(
                kind=_choice(output.get("kind", "classes"), OUTPUT_KINDS, "output.kind"),
                positive_label=str(output.get("positive_label", "")),
            ),
            spelling=_optional_artifact(raw, "spelling", "spelling"),
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ManifestError(f"manifest is malformed ({type(error).__name__}: {error}); rebuild the models") from error
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: Manifest) -> None:
    """ManifestError when the declaration does not hold together (labels, binary output, preprocessing)."""
    labels = manifest.labels
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ManifestError(f"a model needs at least two distinct labels; the manifest has {labels}")
    if manifest.output.kind == "binary" and (len(labels) != 2 or manifest.output.positive_label != labels[1]):
        raise ManifestError(
            f"a binary model has two labels, the negative one first and its positive label second; the manifest "
            f"has labels {labels} and positive label {manifest.output.positive_label!r}"
        )
    if manifest.spelling is not None and not manifest.input.text:
        raise ManifestError(f"spelling correction is for text inputs; this model takes {manifest.input.describe()}")
    for tier, preprocess in (("edge", manifest.edge.preprocess), ("cloud", manifest.cloud.preprocess)):
        if tier == "cloud" and manifest.cloud.onnx is None:
            continue  # relayed upstream: the upstream server takes the input as sent
        if (preprocess == "tensor") == manifest.input.text:
            raise ManifestError(
                f"the {tier} tier is fed by {preprocess}, which does not fit input {manifest.input.describe()}"
            )


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The JSON object form of a manifest."""
    return dataclasses.asdict(manifest)


# The files each runtime loads, by role: a process verifies what it serves, not the whole set. A role the
# manifest has no file for (an imported model without a tokenizer, say) is not checked.
SPELLING_ROLE = "spelling"
CLOUD_ROLES = ("cloud.onnx", "cloud.tokenizer", SPELLING_ROLE)
EDGE_VARIANT_ROLES = {"int8": "edge.onnx", "fp32": "edge.fp32_onnx", "qdq": "edge.qdq_onnx"}
EDGE_ROLES = ("edge.onnx", "edge.tokenizer", SPELLING_ROLE)
ROLES = frozenset({*CLOUD_ROLES, *EDGE_VARIANT_ROLES.values(), *EDGE_ROLES})


def verify_files(model_dir: Path, manifest: Manifest, roles: Collection[str] | None = None) -> None:
    """Check that the files the manifest names (only `roles`, if given) exist and have the recorded sha256."""
    root = Path(model_dir).resolve()
    files = manifest.artifact_files()
    unknown = set(roles or ()) - ROLES
    if unknown:
        raise ValueError(f"unknown artifact roles {sorted(unknown)}; known: {sorted(ROLES)}")
    for role, item in files.items():
        if roles is not None and role not in roles:
            continue
        candidate = (root / item.path).resolve()
        if root not in candidate.parents:
            raise ManifestError(f"manifest entry {role} points outside the model directory: {item.path!r}")
        if not candidate.is_file():
            raise ManifestError(
                f"model file {item.path!r} ({role}) is missing from {model_dir}; "
                "rebuild the models with `tiergate models build`"
            )
        actual = file_sha256(candidate)
        if actual != item.sha256:
            raise ManifestError(
                f"model file {item.path!r} ({role}) is corrupt or was replaced: sha256 {actual[:12]}... "
                f"does not match the manifest's {item.sha256[:12]}...; rebuild the models or restore the file"
            )


def load_manifest(model_dir: Path, verify: bool = True, roles: Collection[str] | None = None) -> Manifest:
    """Read ``model_dir/manifest.json``; with ``verify`` also check the sha256 of every file, or of ``roles`` only."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {model_dir}; build the models first with `tiergate models build --out {model_dir}`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path.name} in {model_dir} is not valid JSON ({error}); rebuild the models") from error
    if not isinstance(raw, dict):
        raise ManifestError(f"{path.name} in {model_dir} must hold a JSON object; rebuild the models")
    manifest = manifest_from_dict(raw)
    if verify:
        verify_files(model_dir, manifest, roles)
    logger.debug("loaded manifest %s version %s", path, manifest.version)
    return manifest


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Atomically write ``manifest`` to ``model_dir/manifest.json`` and return its path."""
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest_to_dict(manifest), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def with_routing(manifest: Manifest, routing: RoutingSpec) -> Manifest:
    """A copy of ``manifest`` with its routing rule replaced."""
    return dataclasses.replace(manifest, routing=routing)


def numbered_versions(root: Path) -> list[tuple[int, Path]] | None:
    """`root`'s numbered version directories, oldest first; None when `root` is itself one built model."""
    if (root / MANIFEST_NAME).is_file():
        return None
    if not root.is_dir():
        raise ManifestError(f"model directory {root} does not exist; build one with `tiergate models build`")
    return sorted((int(path.name), path) for path in root.iterdir() if path.is_dir() and path.name.isdigit())


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def model_directories(root: Path, default_name: str) -> dict[str, Path]:
    """The models served from `root`, by name: `root` itself as `default_name` when it is one built model or a
    directory of numbered versions; else a repository, one directory per model name (each one built model or
    numbered versions), as Triton's model repository lays them out."""
    if (root / MANIFEST_NAME).is_file():
        return {default_name: root}
    if not root.is_dir():
        raise ManifestError(f"model directory {root} does not exist; build one with `tiergate models build`")
    children = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not children or any(path.name.isdigit() for path in children):
        return {default_name: root}
    models = {}
    for path in children:
        if not (path / MANIFEST_NAME).is_file() and not any(p.is_dir() and p.name.isdigit() for p in path.iterdir()):
            continue  # not a model: neither a built set nor numbered versions
        if not _MODEL_NAME.fullmatch(path.name):
            raise ManifestError(f"model directory name {path.name!r} in {root} is not a model name ([A-Za-z0-9._-])")
        models[path.name] = path
    if not models:
        raise ManifestError(
            f"{root} holds no model: expected a manifest.json, numbered versions, or one directory per model"
        )
    return models


@dataclass(frozen=True)
class ChosenSet:
    """The model set a server starts on: its directory, its version ("" for a single built set), its verified
    manifest, and the newer versions refused on the way, with why."""

    path: Path
    version: str
    manifest: Manifest
    refused: dict[str, str]


def newest_verified(root: Path, roles: Collection[str] | None = None) -> ChosenSet:
    """The model set to serve from `root`: `root` itself when it is one built model, else its newest numbered
    version whose files (`roles` only, if given) verify. Each set's files are hashed once. ManifestError when none
    verifies."""
    versions = numbered_versions(root)
    if versions is None:
        return ChosenSet(root, "", load_manifest(root, roles=roles), {})
    refused: dict[str, str] = {}
    for number, path in reversed(versions):
        try:
            manifest = load_manifest(path, roles=roles)
        except ManifestError as error:
            refused[str(number)] = str(error)
            logger.error("model version %d in %s refused: %s", number, root, error)
            continue
        return ChosenSet(path, str(number), manifest, refused)
    raise ManifestError(f"no version in {root} verifies ({'; '.join(refused.values()) or 'no numbered versions'})")
