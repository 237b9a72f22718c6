"""Model stores: publish a built set as numbered versions, fetch one into a versions directory verified, serve it.
Local directories and an fsspec URL (memory://); partial and corrupt versions never reach a server."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest

from app.cli import main
from tests.conftest import StackFactory
from tests.test_gateway import infer_request
from tiergate.manifest import MANIFEST_NAME, load_manifest
from tiergate.model_store import StoreError, fetch, publish, store_versions
from tiergate.settings import CloudSettings, GatewaySettings


def test_publish_adds_numbered_versions_and_never_overwrites_one(tiny_models: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    first = publish(tiny_models, store)
    second = publish(tiny_models, store)
    assert (first.version, second.version) == (1, 2)
    assert store_versions(store) == [1, 2]
    assert first.model_version == load_manifest(tiny_models, verify=False).version
    load_manifest(tmp_path / "store" / "1", verify=True)  # a complete, verifying copy
    with pytest.raises(StoreError, match="version 2 already exists"):
        publish(tiny_models, store, version=2)


def test_a_set_that_does_not_verify_is_not_published(tiny_models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models, broken)
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    edge = broken / manifest["edge"]["onnx"]["path"]
    edge.write_bytes(edge.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match=r"refusing to publish .* corrupt or was replaced"):
        publish(broken, str(tmp_path / "store"))
    assert store_versions(str(tmp_path / "store")) == []


def test_fetch_places_the_newest_version_verified_and_keeps_one_there(tiny_models: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    publish(tiny_models, store)
    publish(tiny_models, store)
    served = tmp_path / "served"
    target = fetch(store, served)
    assert target == served / "2"
    load_manifest(target, verify=True)
    assert fetch(store, served) == target  # already there and verifying: kept
    assert fetch(store, served, version=1) == served / "1"
    assert sorted(path.name for path in served.iterdir()) == ["1", "2"], "no staging directory is left behind"
    with pytest.raises(StoreError, match="has no version 7; available: 1, 2"):
        fetch(store, served, version=7)


def test_a_partial_or_corrupt_version_never_reaches_the_versions_directory(tiny_models: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    publish(tiny_models, str(store))
    # A publish cut off before its manifest: not a version readers see.
    shutil.copytree(store / "1", store / "2")
    (store / "2" / MANIFEST_NAME).unlink()
    assert store_versions(str(store)) == [1]
    # A file changed in the store after publishing: the fetch verifies, refuses and places nothing.
    manifest = json.loads((store / "1" / MANIFEST_NAME).read_text())
    cloud = store / "1" / manifest["cloud"]["onnx"]["path"]
    cloud.write_bytes(cloud.read_bytes()[:-1] + b"\x00")
    served = tmp_path / "served"
    with pytest.raises(StoreError, match=r"version 1 of .* does not verify, so it was not placed"):
        fetch(str(store), served)
    assert list(served.iterdir()) == []
    with pytest.raises(StoreError, match="holds no complete version"):
        fetch(str(tmp_path / "empty"), served)


def test_an_fsspec_url_is_a_store_too(tiny_models: Path, tmp_path: Path) -> None:
    url = f"memory://tiergate-{uuid.uuid4().hex}/product-category"
    try:
        assert publish(tiny_models, url).location == f"{url}/1"
        assert store_versions(url) == [1]
        load_manifest(fetch(url, tmp_path / "served"), verify=True)
    finally:
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path.rsplit("/", 1)[0], recursive=True)
    with pytest.raises(StoreError, match="cannot open model store"):
        store_versions("no-such-protocol://bucket/models")


async def test_published_fetched_and_served(
    start_stack: StackFactory, tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The deploy path as plain commands: publish a set, fetch it where the pods read, serve what was fetched."""
    store, served = tmp_path / "store", tmp_path / "served"
    assert main(["models", "publish", str(tiny_models), str(store)]) == 0
    assert "as version 1" in capsys.readouterr().out
    assert main(["models", "fetch", str(store), str(served)]) == 0
    assert "every file verified" in capsys.readouterr().out
    assert main(["models", "fetch", str(store), str(served), "--version", "3"]) == 2
    assert "has no version 3; available: 1" in capsys.readouterr().err

    def from_the_store(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        gateway.models_dir = served
        cloud.models_dir = served / "1"

    stack = await start_stack(configure=from_the_store)
    reply = await stack.stub.ModelInfer(infer_request(["organic whole milk"]), timeout=10.0)
    assert reply.model_version == "1"
    assert len(reply.outputs[0].contents.bytes_contents) == 1
