"""End-to-end test of the model pipeline on a tiny generated catalogue, loaded through the serving runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the train extra (torch) is needed to build models")

from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from tiergate.manifest import ManifestError, load_manifest
from tiergate.scoring import SIGNALS
from training.calibrate import calibrate
from training.data import heldout_examples
from training.tiny import build_tiny_models, tiny_examples

# The model set under test is the session's ``tiny_models`` (tests/conftest.py); tests that change files copy it.


def test_manifest_fields(tiny_models: Path) -> None:
    manifest = load_manifest(tiny_models)
    assert manifest.format_version == 3, "format 3: a manifest naming a spelling vocabulary"
    assert [(i.name, i.datatype, i.shape) for i in manifest.inputs] == [("text", "BYTES", [-1])]
    assert manifest.output.kind == "classes" and manifest.edge.preprocess == "ngrams"
    assert manifest.cloud.preprocess == "tokenizer" and manifest.cloud.scores == "logits"
    assert manifest.data["source"] == "demo data: synthetic"
    assert "/" not in manifest.data["source"]
    assert 3 <= len(manifest.labels) <= 6
    assert manifest.routing.signal in SIGNALS
    assert 0.0 <= manifest.routing.threshold <= 1.0 + 1e-6
    assert manifest.routing.calibration["split"] == "validation"
    assert manifest.edge.featurizer["kind"] == "hashed_ngram"
    assert manifest.edge.temperature > 0 and manifest.cloud.temperature > 0
    for item in manifest.artifact_files().values():
        assert not Path(item.path).is_absolute() and (tiny_models / item.path).is_file()
    assert set(manifest.metrics["test"]) >= {
        "edge_int8_accuracy",
        "cloud_accuracy",
        "cascade_accuracy",
        "escalation_rate",
    }
    assert manifest.metrics["edge_alternatives"][0]["chosen"] is True


def test_models_predict_labels(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> None:
    texts = [text for text, _ in tiny_rows]
    edge = EdgeModel.load(tiny_models)
    cloud = CloudModel.load(tiny_models)
    try:
        for model in (edge, cloud):
            scored = model.predict(texts)
            assert scored.label_index.shape == (len(texts),)
            assert scored.signal.shape == (len(texts),)
            assert ((scored.signal >= 0) & (scored.signal <= 1)).all()
            assert model.labels == load_manifest(tiny_models).labels
            assert model.logits([]).shape == (0, len(model.labels))
        gold = np.array([edge.labels.index(label) for _, label in tiny_rows])
        assert (cloud.predict(texts).label_index == gold).mean() > 0.7
        assert (edge.predict(texts).label_index == gold).mean() > 0.5
    finally:
        edge.close()
        cloud.close()


def test_int8_edge_agrees_with_fp32(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> None:
    texts = [text for text, _ in tiny_rows]
    int8 = EdgeModel.load(tiny_models, variant="int8")
    fp32 = EdgeModel.load(tiny_models, variant="fp32")
    qdq = EdgeModel.load(tiny_models, variant="qdq")
    try:
        reference = fp32.predict(texts).label_index
        assert (int8.predict(texts).label_index == reference).mean() >= 0.9
        assert (qdq.predict(texts).label_index == reference).mean() >= 0.85
    finally:
        for model in (int8, fp32, qdq):
            model.close()


def test_onnx_interfaces(tiny_models: Path) -> None:
    import onnxruntime as ort

    manifest = load_manifest(tiny_models)
    edge = ort.InferenceSession(str(tiny_models / manifest.edge.onnx.path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in edge.get_inputs()] == [("ids", "tensor(int32)")]
    assert [o.name for o in edge.get_outputs()] == ["logits"]
    cloud = ort.InferenceSession(str(tiny_models / manifest.cloud.onnx.path), providers=["CPUExecutionProvider"])
    assert {(i.name, i.type) for i in cloud.get_inputs()} == {
        ("input_ids", "tensor(int64)"),
        ("attention_mask", "tensor(int64)"),
        ("ngram_ids", "tensor(int32)"),
    }
    assert [o.name for o in cloud.get_outputs()] == ["logits", "deep_logits", "lexical_logits"]
    assert manifest.cloud.featurizer is not None
    assert [b["char_ngrams"] for b in manifest.cloud.featurizer["blocks"]] == [[0, 0], [2, 5]]


def test_cloud_graph_fuses_its_parts_as_the_manifest_says(tiny_models: Path, tiny_rows: list[tuple[str, str]]) -> None:
    from training.cloud_train import Fusion, fuse

    manifest = load_manifest(tiny_models)
    fusion = Fusion(**manifest.cloud.metrics["training"]["fusion"])
    cloud = CloudModel.load(tiny_models)
    try:
        parts = cloud.components([text for text, _ in tiny_rows])
    finally:
        cloud.close()
    np.testing.assert_allclose(parts["logits"], fuse(parts["deep_logits"], parts["lexical_logits"], fusion), atol=1e-4)


def test_tensorrt_backend_is_a_clear_error(tiny_models: Path) -> None:
    with pytest.raises(RuntimeError, match="TensorRT backend is not available"):
        EdgeModel.load(tiny_models, backend="tensorrt")


def test_heldout_examples_are_the_test_split(tiny_models: Path) -> None:
    assert heldout_examples(tiny_models) == tiny_examples()
    assert len(heldout_examples(tiny_models, limit=5)) == 5


def test_build_is_deterministic(tiny_models: Path, tmp_path: Path) -> None:
    """A second build with the same seed matches the session's build."""
    again = load_manifest(build_tiny_models(tmp_path / "again", seed=0))
    first = load_manifest(tiny_models)
    assert again.labels == first.labels
    assert again.data["sizes"] == first.data["sizes"]
    assert again.metrics["test"] == first.metrics["test"]
    assert again.routing.signal == first.routing.signal
    for key in ("served_variant", "validation_accuracy"):
        assert again.edge.metrics[key] == first.edge.metrics[key]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_file_is_caught_by_the_runtime_that_loads_it(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    manifest = load_manifest(copy)
    _flip_a_byte(copy / manifest.edge.onnx.path)
    with pytest.raises(ManifestError, match="corrupt"):
        EdgeModel.load(copy)
    CloudModel.load(copy).close()  # the cloud never loads the edge file
    _flip_a_byte(copy / manifest.cloud.onnx.path)
    with pytest.raises(ManifestError, match="corrupt"):
        CloudModel.load(copy)


def test_missing_model_file_names_the_fix(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    (copy / load_manifest(copy).cloud.tokenizer.path).unlink()
    with pytest.raises(ManifestError, match=r"missing.*tiergate models build"):
        CloudModel.load(copy)


@pytest.mark.parametrize("target", [0.1, 0.3])
def test_calibrate_for_target_escalation(tiny_models: Path, tmp_path: Path, target: float) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    routing = calibrate(copy, None, target_escalation=target)
    assert routing.calibration["target"] == {"kind": "escalation", "value": target}
    assert abs(routing.calibration["achieved_escalation"] - target) <= 0.05
    assert load_manifest(copy).routing == routing


def test_calibrate_for_target_quality(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    routing = calibrate(copy, None, target_quality=0.99)
    assert routing.calibration["quality_ratio"] >= 0.99
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(copy, None)


def test_truncated_minilm_alternative_is_measured_and_recorded(tiny_models: Path, tmp_path: Path) -> None:
    from training.edge_alternatives import truncated_minilm_alternative

    copy = tmp_path / "copy"
    shutil.copytree(tiny_models, copy)
    served_before = {role: item.sha256 for role, item in load_manifest(copy).artifact_files().items()}
    result = truncated_minilm_alternative(copy, None, tmp_path / "work", layers=1, epochs=1)
    assert result["name"] == "minilm-first-1-layers-distilled"
    assert result["teacher"] == "cloud deep_logits"  # not the fused logits, whose lexical part memorised train
    assert 0.0 <= result["validation_accuracy"]["dynamic_per_channel"] <= 1.0 and result["int8_bytes"] > 0
    manifest = load_manifest(copy)  # the served files are untouched, so the checksums still verify
    assert {role: item.sha256 for role, item in manifest.artifact_files().items()} == served_before
    assert manifest.metrics["edge_alternatives"][-1]["name"] == result["name"]
    assert not (tmp_path / "work").exists()
