"""An edge that carries the cloud's lexical branch: the fused graph, its featurizer, and a build that ships it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the train extra (torch) is needed to build models")

from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from tests.test_lexical import TEXTS, Y
from tiergate.features import HashedNgramFeaturizer, NgramBlocks
from tiergate.manifest import load_manifest
from training.cloud_train import Fusion, fuse
from training.edge_lexical import EdgeLexicalNet, with_lexical
from training.edge_train import EdgeNet, export_edge_onnx, predict_edge
from training.lexical import train_lexical
from training.tiny import build_tiny_models, tiny_config, tiny_examples

LABELS = ["milk", "yogurt", "bread", "fruit"]


def _parts() -> tuple[EdgeNet, HashedNgramFeaturizer]:
    import torch

    torch.manual_seed(0)
    return EdgeNet(2**10, 8, 16, 4), HashedNgramFeaturizer(n_buckets=2**10, max_features=32)


def test_the_served_graph_is_the_mlp_and_the_cloud_branch_fused(tmp_path: Path) -> None:
    """Through the edge runtime, the graph gives exactly fuse(MLP logits, the branch's margins) on one row of ids."""
    lexical, _ = train_lexical(TEXTS * 2, np.tile(Y, 2), 4, 2**11, 64, c=1.0, folds=2)  # its own bucket count
    mlp, featurizer = _parts()
    fusion = Fusion(alpha=0.4, gamma=2.0)
    net = EdgeLexicalNet(mlp, featurizer.max_features, lexical, fusion)
    blocks = NgramBlocks([featurizer, *NgramBlocks.from_config(lexical.featurizer).blocks])
    path = export_edge_onnx(net, tmp_path / "edge.onnx", sum(blocks.widths))
    edge = EdgeModel.from_files(path, blocks.config(), LABELS)
    try:
        served = edge.logits(TEXTS)
    finally:
        edge.close()
    expected = fuse(predict_edge(mlp, featurizer.transform(TEXTS)), lexical.margins(lexical.featurize(TEXTS)), fusion)
    np.testing.assert_allclose(served, expected, atol=1e-4)
    # The branch decides where the MLP is unsure: an untrained MLP fused with the trained branch classifies.
    assert (served.argmax(1) == Y).mean() == 1.0
    assert (predict_edge(mlp, featurizer.transform(TEXTS)).argmax(1) == Y).mean() < 1.0


def test_with_lexical_fits_the_fusion_on_validation_and_reports_each_part() -> None:
    lexical, _ = train_lexical(TEXTS * 2, np.tile(Y, 2), 4, 2**11, 64, c=1.0, folds=2)
    mlp, featurizer = _parts()
    val_logits = predict_edge(mlp, featurizer.transform(TEXTS))
    net, blocks, info = with_lexical(mlp, featurizer, lexical, val_logits, TEXTS, Y)
    assert blocks.widths == [featurizer.max_features, *lexical.widths]
    assert blocks.config()["blocks"][1:] == lexical.featurizer["blocks"]  # the cloud's blocks, unchanged
    parts = info["validation_accuracy_by_part"]
    assert parts["lexical"] == 1.0 and parts["mlp"] < 1.0
    assert parts["fused"] >= max(parts["mlp"], parts["lexical"]) - 1e-9  # alpha = 0 is on the grid
    assert net.fusion == Fusion(**info["fusion"])


@pytest.fixture(scope="module")
def lexical_edge_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = replace(tiny_config(), edge_lexical=True)
    return build_tiny_models(tmp_path_factory.mktemp("edge-lexical"), config=config)


def test_a_build_ships_an_edge_that_carries_the_clouds_branch(lexical_edge_models: Path) -> None:
    manifest = load_manifest(lexical_edge_models)
    assert manifest.edge.featurizer is not None and manifest.cloud.featurizer is not None
    edge_blocks = manifest.edge.featurizer["blocks"]
    assert edge_blocks[1:] == manifest.cloud.featurizer["blocks"]
    assert edge_blocks[0]["n_buckets"] == tiny_config().edge_candidates[0].n_buckets
    training = manifest.edge.metrics["training"]
    assert set(training["lexical_branch"]) == {"fusion", "validation_accuracy_by_part"}
    # Both tiers load and answer through the runtime; the edge's branch is the cloud's, weight for weight.
    edge = EdgeModel.load(lexical_edge_models, manifest, variant="fp32")
    cloud = CloudModel.load(lexical_edge_models, manifest)
    texts = [text for text, _ in tiny_examples()]
    try:
        edge_logits, lexical = edge.logits(texts), cloud.components(texts)["lexical_logits"]
    finally:
        edge.close()
        cloud.close()
    # On the tiny catalogue the branch alone is right on every validation row, so the fit leaves the MLP out
    # (alpha 0: ties in accuracy go to the lower log-loss) and the edge answers with the cloud's branch itself.
    fusion = Fusion(**training["lexical_branch"]["fusion"])
    assert fusion.alpha == 0.0
    np.testing.assert_allclose(edge_logits, fuse(lexical, lexical, fusion), atol=1e-4)
    gold = np.array([manifest.labels.index(label) for _, label in tiny_examples()])
    assert (edge_logits.argmax(1) == gold).mean() >= 0.8


def test_without_a_cloud_branch_the_edge_stays_a_plain_mlp(tmp_path: Path) -> None:
    base = tiny_config()
    config = replace(base, edge_lexical=True, cloud=replace(base.cloud, lexical_buckets=0))
    manifest = json.loads((build_tiny_models(tmp_path, config=config) / "manifest.json").read_text())
    assert manifest["edge"]["featurizer"]["kind"] == "hashed_ngram"
    assert "lexical_branch" not in manifest["edge"]["metrics"]["training"]
