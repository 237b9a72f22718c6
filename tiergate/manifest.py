"""The model manifest: which artifact files make up a model set, their checksums and routing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The model directory or its manifest is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class ArtifactFile:
    """One file of the model set, relative to the model directory, with its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class EdgeSpec:
    """The edge tier: the served INT8 ONNX file, its QDQ and FP32 siblings and the featurizer."""

    onnx: ArtifactFile
    qdq_onnx: ArtifactFile
    fp32_onnx: ArtifactFile
    featurizer: dict[str, Any]
    temperature: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CloudSpec:
    """The cloud tier: the FP32 ONNX classifier, its ``tokenizers`` tokenizer.json and, when the graph
    has a lexical branch, the hashed n-gram featurizer that feeds it."""

    onnx: ArtifactFile
    tokenizer: ArtifactFile
    max_length: int
    temperature: float
    metrics: dict[str, Any] = field(default_factory=dict)
    featurizer: dict[str, Any] | None = None


@dataclass(frozen=True)
class RoutingSpec:
    """The escalation rule: escalate when the edge's ``signal`` confidence is below ``threshold``."""

    signal: str
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)


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

    def artifact_files(self) -> dict[str, ArtifactFile]:
        """Every file the manifest names, keyed by its role."""
        return {
            "edge.onnx": self.edge.onnx,
            "edge.qdq_onnx": self.edge.qdq_onnx,
            "edge.fp32_onnx": self.edge.fp32_onnx,
            "cloud.onnx": self.cloud.onnx,
            "cloud.tokenizer": self.cloud.tokenizer,
        }


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


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Parse a manifest from its JSON object, raising ManifestError on a malformed one."""
    try:
        version = int(raw["format_version"])
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {version} is not supported (expected {FORMAT_VERSION}); "
                "rebuild the models with `tiergate models build`"
            )
        edge, cloud, routing = raw["edge"], raw["cloud"], raw["routing"]
        return Manifest(
            format_version=version,
            version=str(raw["version"]),
            created_at=str(raw["created_at"]),
            task=str(raw["task"]),
            data=dict(raw["data"]),
            labels=[str(label) for label in raw["labels"]],
            edge=EdgeSpec(
                onnx=_artifact_from_dict(edge["onnx"], "edge.onnx"),
                qdq_onnx=_artifact_from_dict(edge["qdq_onnx"], "edge.qdq_onnx"),
                fp32_onnx=_artifact_from_dict(edge["fp32_onnx"], "edge.fp32_onnx"),
                featurizer=dict(edge["featurizer"]),
                temperature=float(edge["temperature"]),
                metrics=dict(edge.get("metrics", {})),
            ),
            cloud=CloudSpec(
                onnx=_artifact_from_dict(cloud["onnx"], "cloud.onnx"),
                tokenizer=_artifact_from_dict(cloud["tokenizer"], "cloud.tokenizer"),
                max_length=int(cloud["max_length"]),
                temperature=float(cloud["temperature"]),
                metrics=dict(cloud.get("metrics", {})),
                featurizer=dict(cloud["featurizer"]) if cloud.get("featurizer") is not None else None,
            ),
            routing=RoutingSpec(
                signal=str(routing["signal"]),
                threshold=float(routing["threshold"]),
                calibration=dict(routing.get("calibration", {})),
            ),
            metrics=dict(raw.get("metrics", {})),
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"manifest is malformed ({type(error).__name__}: {error}); rebuild the models") from error


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The JSON object form of a manifest."""
    return dataclasses.asdict(manifest)


# The files each runtime loads, by role: a process verifies what it serves, not the whole set.
CLOUD_ROLES = ("cloud.onnx", "cloud.tokenizer")
EDGE_VARIANT_ROLES = {"int8": "edge.onnx", "fp32": "edge.fp32_onnx", "qdq": "edge.qdq_onnx"}


def verify_files(model_dir: Path, manifest: Manifest, roles: Collection[str] | None = None) -> None:
    """Check that the files the manifest names (only `roles`, if given) exist and have the recorded sha256."""
    root = Path(model_dir).resolve()
    files = manifest.artifact_files()
    unknown = set(roles or ()) - set(files)
    if unknown:
        raise ValueError(f"unknown artifact roles {sorted(unknown)}; known: {sorted(files)}")
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
