"""Unit tests for manifest reading, writing and checksum verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiergate.manifest import (
    MANIFEST_NAME,
    ArtifactFile,
    CloudSpec,
    EdgeSpec,
    Manifest,
    ManifestError,
    RoutingSpec,
    artifact,
    file_sha256,
    load_manifest,
    with_routing,
    write_manifest,
)


def _manifest(model_dir: Path) -> Manifest:
    files = {}
    for name in ("edge/int8.onnx", "edge/qdq.onnx", "edge/fp32.onnx", "cloud/cloud.onnx", "cloud/tokenizer.json"):
        path = model_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
        files[name] = artifact(model_dir, path)
    return Manifest(
        format_version=1,
        version="v1",
        created_at="2026-01-01T00:00:00+00:00",
        task="aisle",
        data={"source": "demo data: synthetic", "seed": 0},
        labels=["a", "b"],
        edge=EdgeSpec(
            onnx=files["edge/int8.onnx"],
            qdq_onnx=files["edge/qdq.onnx"],
            fp32_onnx=files["edge/fp32.onnx"],
            featurizer={"kind": "hashed_ngram"},
            temperature=1.2,
            metrics={},
        ),
        cloud=CloudSpec(
            onnx=files["cloud/cloud.onnx"],
            tokenizer=files["cloud/tokenizer.json"],
            max_length=24,
            temperature=0.9,
            metrics={},
        ),
        routing=RoutingSpec(
            signal="margin", threshold=0.3, calibration={"target": {"kind": "escalation", "value": 0.15}}
        ),
        metrics={"test": {"cascade_accuracy": 0.9}},
    )


def test_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert write_manifest(tmp_path, manifest) == tmp_path / MANIFEST_NAME
    assert load_manifest(tmp_path) == manifest


def test_paths_are_relative(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert manifest.edge.onnx.path == "edge/int8.onnx"
    written = write_manifest(tmp_path, manifest)
    assert str(tmp_path) not in written.read_text()


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    assert file_sha256(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "edge/int8.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"edge/int8.onnx.*corrupt"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path, verify=False).labels == ["a", "b"]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "cloud/tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer.json.*missing.*tiergate models build"):
        load_manifest(tmp_path)


def test_missing_manifest_is_actionable(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="tiergate models build"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format_version": 1})])
def test_malformed_manifest(tmp_path: Path, content: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError):
        load_manifest(tmp_path)


def test_unsupported_format_version(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["format_version"] = 99
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="format_version 99"):
        load_manifest(tmp_path)


def test_path_escaping_model_dir_is_rejected(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    bad = with_routing(manifest, manifest.routing)
    object.__setattr__(bad.edge, "onnx", ArtifactFile(path="../outside.onnx", sha256="0" * 64))
    write_manifest(tmp_path, bad)
    with pytest.raises(ManifestError, match="outside the model directory"):
        load_manifest(tmp_path)


def test_with_routing_replaces_only_routing(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    updated = with_routing(manifest, RoutingSpec(signal="entropy", threshold=0.5, calibration={}))
    assert updated.routing.threshold == 0.5 and updated.edge == manifest.edge and manifest.routing.threshold == 0.3


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


def test_roles_limit_verification_to_what_a_process_loads(tiny_models: Path, tmp_path: Path) -> None:
    import shutil

    from tiergate.manifest import CLOUD_ROLES, EDGE_VARIANT_ROLES

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    manifest = load_manifest(models)
    (models / manifest.cloud.onnx.path).unlink()
    # An edge host holding only the edge files verifies fine; anything that loads the cloud model fails.
    assert load_manifest(models, roles=[EDGE_VARIANT_ROLES["int8"]]) == manifest
    with pytest.raises(ManifestError, match=r"cloud\.onnx"):
        load_manifest(models, roles=CLOUD_ROLES)
    with pytest.raises(ManifestError):
        load_manifest(models)
    with pytest.raises(ValueError, match="unknown artifact roles"):
        load_manifest(models, roles=["edge.onx"])
