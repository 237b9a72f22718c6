"""Model sets on their way from a build to the pods that serve them: a store of numbered versions, local or remote.

A store is a directory or an fsspec URL (`s3://bucket/models/product-category` with s3fs installed, `gs://` with
gcsfs, `memory://` in tests) holding numbered version directories, each a model set with its manifest.
`publish` verifies a built set and adds it as the next version; `fetch` copies a version into a local versions
directory (the layout `--models` serves and hot-reloads) and verifies every file's sha256 before the version
appears there. Readers never see half a version: the manifest is written last to a store (a version without
one is not listed), and a fetched version is renamed into place only once it verified.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiergate.manifest import MANIFEST_NAME, ManifestError, load_manifest

logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """A store that cannot be read or written, or holds no such version; the message says what to do."""


@dataclass(frozen=True)
class Published:
    """Where `publish` put a model set."""

    version: int
    location: str
    model_version: str  # the manifest's own version string
    files: int


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path inside it; a missing protocol package says which to install."""
    try:
        import fsspec
    except ImportError as error:  # a dependency of the project; only a broken install lacks it
        raise StoreError("model stores need fsspec: pip install fsspec") from error
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise StoreError(
            f"cannot open model store {url!r}: {error} (s3:// needs s3fs, gs:// needs gcsfs in this image)"
        ) from error
    return fs, str(path).rstrip("/") or "/"


def store_versions(url: str) -> list[int]:
    """The complete versions (numbered directories holding a manifest) in the store at `url`, oldest first."""
    fs, root = _filesystem(url)
    if not fs.exists(root):
        return []
    versions = []
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(str(entry).rstrip("/"))
        if name.isdigit() and fs.exists(posixpath.join(root, name, MANIFEST_NAME)):
            versions.append(int(name))
    return sorted(versions)


def publish(model_dir: Path, url: str, version: int | None = None) -> Published:
    """Verify the model set at `model_dir` and add it to the store at `url` as `version` (default: the next)."""
    try:
        manifest = load_manifest(model_dir, verify=True)
    except ManifestError as error:
        raise StoreError(f"refusing to publish {model_dir}: {error}") from error
    fs, root = _filesystem(url)
    existing = store_versions(url)
    number = (max(existing, default=0) + 1) if version is None else version
    if number < 1:
        raise StoreError(f"versions are numbered from 1, got {number}")
    target = posixpath.join(root, str(number))
    if number in existing or fs.exists(target):
        raise StoreError(f"version {number} already exists in {url}; versions are never overwritten, publish a new one")
    files = sorted(path for path in Path(model_dir).rglob("*") if path.is_file() and path.name != MANIFEST_NAME)
    fs.makedirs(target, exist_ok=True)
    for path in files:
        relative = path.relative_to(model_dir).as_posix()
        destination = posixpath.join(target, relative)
        fs.makedirs(posixpath.dirname(destination), exist_ok=True)
        fs.put_file(str(path), destination)
    # Last: until the manifest is there, readers do not list the version.
    fs.put_file(str(Path(model_dir) / MANIFEST_NAME), posixpath.join(target, MANIFEST_NAME))
    logger.info(
        "published model set %s as version %d of %s (%d files and its manifest)",
        manifest.version,
        number,
        url,
        len(files),
    )
    return Published(number, f"{url.rstrip('/')}/{number}", manifest.version, len(files) + 1)


def fetch(url: str, versions_dir: Path, version: int | None = None) -> Path:
    """Copy `version` (default: the newest) of the store at `url` into `versions_dir`/N, verified.

    A version already there and verifying is kept as it is. The copy lands beside the target and is renamed
    into place only after every file matched its manifest's sha256, so a server polling `versions_dir` never
    loads a partial or corrupt version.
    """
    available = store_versions(url)
    if not available:
        raise StoreError(f"model store {url} holds no complete version; publish one with `tiergate models publish`")
    number = available[-1] if version is None else version
    if number not in available:
        raise StoreError(f"model store {url} has no version {number}; available: {', '.join(map(str, available))}")
    versions_dir.mkdir(parents=True, exist_ok=True)
    target = versions_dir / str(number)
    if target.exists():
        try:
            load_manifest(target, verify=True)
        except ManifestError as error:
            raise StoreError(f"{target} exists but does not verify ({error}); remove it and fetch again") from error
        logger.info("version %d is already in %s and verifies", number, versions_dir)
        return target
    fs, root = _filesystem(url)
    staging = versions_dir / f".fetch-{number}-{uuid.uuid4().hex[:8]}"
    try:
        source = posixpath.join(root, str(number))
        for entry in fs.find(source):
            relative = posixpath.relpath(str(entry), source)
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(entry, str(local))
        try:
            load_manifest(staging, verify=True)
        except ManifestError as error:
            raise StoreError(f"version {number} of {url} does not verify, so it was not placed: {error}") from error
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("fetched version %d of %s into %s, verified", number, url, versions_dir)
    return target
