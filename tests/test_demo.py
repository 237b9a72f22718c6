"""`tiergate demo` (what `make run` calls) on prebuilt tiny models: servers start, traffic flows, a summary prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


# What leaked library output looks like: warnings (TracerWarning, "WARNING root: ...") and tqdm bars.
NOISE = ("Warning", "WARNING", "it/s]", "s/it]", "%|")


def run_cli(*args: str) -> str:
    """Run `tiergate ARGS` in a fresh process at its default log level; return its stdout, failing with its
    output on a non-zero exit or when either stream holds library noise."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for stream in (done.stdout, done.stderr):
        noisy = [line for line in stream.split("\n") if any(marker in line for marker in NOISE)]
        assert noisy == [], "\n".join(noisy)
    return done.stdout


def test_demo_runs_and_summarises(tiny_models: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    repository = tmp_path / "repository"
    args = ["--keys", str(keys), "--repository", str(repository), "--requests", "150", "--concurrency", "4"]
    out = run_cli("demo", "--models", str(tiny_models), *args)
    assert f"keys: created {keys}" in out and "boundary: mutual TLS on the hop" in out
    assert (keys / "ca.pem").is_file() and "demo" in (keys / "tokens.json").read_text()
    assert "=== Tiergate demo summary ===" in out
    assert "errors: none" in out
    assert "answered at edge" in out and "escalations" in out
    assert "servers stopped (gateway exit 0, cloud exit 0)" in out
    # The story is told in order: data, models, servers, traffic, summary.
    prefixes = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith((" ", "="))]
    story = [p for p in dict.fromkeys(prefixes) if p in {"data", "models", "servers", "traffic"}]
    assert story == ["data", "models", "servers", "traffic"]
    sent = next(line for line in out.splitlines() if line.startswith("requests sent")).split()
    total, answered = int(sent[2]), int(sent[3].lstrip("("))
    assert total == 150 and answered == total
    # Both models, each with its own summary and escalation share.
    sections = out.split("--- model ")[1:]
    assert [section.split(" ---")[0] for section in sections] == ["product-category", "purchase-propensity (DEMO DATA)"]
    tensor = sections[1]
    assert "requests sent       50 (50 answered, errors: none)" in tensor
    assert "answered at edge" in tensor and "low_confidence=" in tensor
    assert (repository / "product-category").is_symlink() and (repository / "purchase-propensity" / "1").is_dir()
    assert "models: built purchase-propensity in" in out


def test_bench_prints_setup_models_and_tier_paths(tiny_models: Path, tmp_path: Path) -> None:
    # The tracing-cost section starts three more stacks; its parts are tested in tests/test_bench.py.
    keys = str(tmp_path / "keys")
    out = run_cli(
        "bench",
        "--models",
        str(tiny_models),
        "--keys",
        keys,
        "--calls",
        "40",
        "--requests",
        "60",
        "--skip",
        "tracing,hedging,performance",
    )
    assert "setup:" in out and "onnxruntime" in out
    for row in ("edge int8", "edge qdq", "edge fp32", "cloud fp32", "cloud (client hint)"):
        assert row in out
    assert "ratios: cloud/edge-int8 batch-1 p50" in out and "ratio: cloud-path/edge-path p50" in out
    assert "sealing cost:" in out and "tracing cost:" not in out
    assert any(line.startswith("mutual TLS") and "1 KiB" in line for line in out.splitlines())
