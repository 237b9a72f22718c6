"""Reproducible builds and honest numbers: the tiny build made twice is the same build, the manifest records what
made it, and the evaluation reports intervals and how the cascade holds up on queries as shoppers type them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tiergate.manifest import load_manifest
from training.measure import bootstrap_ci
from training.tiny import build_tiny_models, tiny_config

pytestmark = pytest.mark.slow


def test_the_tiny_build_made_twice_is_the_same_build_augmentation_included(tmp_path: Path) -> None:
    config = replace(tiny_config(), edge_augment_copies=1)
    first = load_manifest(build_tiny_models(tmp_path / "a", seed=0, config=config))
    second = load_manifest(build_tiny_models(tmp_path / "b", seed=0, config=config))
    assert first.metrics["test"] == second.metrics["test"]
    assert first.routing == second.routing
    assert {r: f.sha256 for r, f in first.artifact_files().items()} == {
        r: f.sha256 for r, f in second.artifact_files().items()
    }, "the same files, byte for byte"
    assert first.edge.metrics["training"]["augment_copies"] == 1
    record = first.data["reproducibility"]
    assert record["seed"] == 0 and record["torch_threads"] == 2
    assert record["packages"]["torch"] and record["packages"]["onnxruntime"] and record["python"]


def test_bootstrap_intervals_are_seeded_and_hold_the_estimate() -> None:
    rng = np.random.default_rng(0)
    edge = rng.random(2000) < 0.7
    cloud = rng.random(2000) < 0.8
    ci = bootstrap_ci({"edge": edge, "cloud": cloud}, {"ratio": ("edge", "cloud")}, resamples=500, seed=1)
    assert ci == bootstrap_ci({"edge": edge, "cloud": cloud}, {"ratio": ("edge", "cloud")}, resamples=500, seed=1)
    assert ci["edge"][0] < edge.mean() < ci["edge"][1] and ci["edge"][1] - ci["edge"][0] < 0.06
    assert ci["ratio"][0] < edge.mean() / cloud.mean() < ci["ratio"][1]
    with pytest.raises(ValueError, match="one length"):
        bootstrap_ci({"a": edge, "b": cloud[:10]})


def test_eval_reports_intervals_and_a_robustness_section(tiny_models: Path, tmp_path: Path) -> None:
    from training.evaluate import UNCORRECTED_MISSPELL, evaluate

    report = evaluate(tiny_models, None, tmp_path / "report", latency_samples=10, robustness_rows=60)
    ci = report["test"]["ci95"]
    op = report["test"]["operating_point"]
    assert set(ci) == {"edge_accuracy", "cloud_accuracy", "cascade_accuracy", "escalation", "quality_ratio"}
    assert ci["cascade_accuracy"][0] <= op["cascade_accuracy"] <= ci["cascade_accuracy"][1]
    robust = report["robustness"]
    assert robust["rows"] == 60
    assert set(robust["families"]) == {
        "misspell",
        UNCORRECTED_MISSPELL,
        "typo",
        "casing",
        "drop_word",
        "reorder",
        "abbreviate",
        "pack_size",
    }
    # The same misspelled rows, read through the spelling vocabulary and as they came.
    assert robust["spelling_correction"] is True
    corrected, uncorrected = robust["families"]["misspell"], robust["families"][UNCORRECTED_MISSPELL]
    assert corrected["changed_rows"] == uncorrected["changed_rows"]
    assert corrected["cascade_accuracy"] >= uncorrected["cascade_accuracy"]
    for name, family in robust["families"].items():
        assert 0.0 <= family["cascade_accuracy"] <= 1.0 and family["cascade_vs_clean"] is not None, name
        assert family["changed_rows"] > 0.5, f"{name} changed too few rows"
    assert "misspelled_cascade_ge_0.95_of_clean" in report["targets"]
    assert "misspelled_escalation_rises" in report["targets"]
    markdown = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Robustness: queries as shoppers type them" in markdown and "| misspell |" in markdown
    assert "`typo`: one keyboard slip" in markdown and f"| {UNCORRECTED_MISSPELL} |" in markdown
    again = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert again["robustness"]["families"]["typo"] == robust["families"]["typo"]
