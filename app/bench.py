"""`make bench`: edge INT8 vs FP32 vs cloud latency and size, then per-tier latency through real servers, in one run."""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
from pathlib import Path

import onnxruntime

from app.demo import LocalStack, ensure_keyring, ensure_models, send_traffic
from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from tiergate.manifest import load_manifest
from training.measure import Timing, percentile, time_calls


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def run_bench(models_dir: Path, data_dir: Path | None, keyring_path: Path, requests: int, calls: int) -> int:
    from training.data import heldout_examples

    ensure_models(models_dir, data_dir)
    manifest = load_manifest(models_dir)
    texts = [text for text, _ in heldout_examples(models_dir, data_dir)]
    print("=== Tiergate benchmark ===")
    print(
        f"setup: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
        f"{onnxruntime.__version__}, 1 intra-op thread per model; models {manifest.version} "
        f"({manifest.data.get('source')}, task {manifest.task}, {len(manifest.labels)} labels); "
        f"{len(texts)} held-out texts; {calls} timed calls per row below (after warm-up)"
    )
    rows: list[tuple[str, float, Timing, Timing]] = []
    for variant, artifact in (
        ("int8", manifest.edge.onnx),
        ("qdq", manifest.edge.qdq_onnx),
        ("fp32", manifest.edge.fp32_onnx),
    ):
        edge = EdgeModel.load(models_dir, manifest, variant=variant)
        rows.append(
            (
                f"edge {variant} ({Path(artifact.path).name})",
                _size_mb(models_dir / artifact.path),
                time_calls(edge.predict, texts, 1, calls),
                time_calls(edge.predict, texts, 32, max(10, calls // 10)),
            )
        )
        edge.close()
    cloud = CloudModel.load(models_dir, manifest)
    rows.append(
        (
            "cloud fp32",
            _size_mb(models_dir / manifest.cloud.onnx.path),
            time_calls(cloud.predict, texts, 1, max(50, calls // 5)),
            time_calls(cloud.predict, texts, 32, max(5, calls // 50)),
        )
    )
    cloud.close()
    print(f"{'model':<44}{'MB':>8}{'b1 p50 ms':>11}{'b1 p99 ms':>11}{'b32 rows/s':>12}")
    for name, size, one, many in rows:
        print(f"{name:<44}{size:>8.2f}{one.p50_ms:>11.3f}{one.p99_ms:>11.3f}{many.rows_per_s:>12.0f}")
    int8, fp32, cloud_row = rows[0], rows[2], rows[3]
    print(
        f"ratios: cloud/edge-int8 batch-1 p50 {cloud_row[2].p50_ms / int8[2].p50_ms:.1f}x; "
        f"edge fp32/int8 p50 {fp32[2].p50_ms / int8[2].p50_ms:.2f}x; "
        f"edge fp32/int8 size {fp32[1] / int8[1]:.2f}x; cloud/edge-int8 size {cloud_row[1] / int8[1]:.1f}x"
    )

    ensure_keyring(keyring_path)
    examples = [(text, "") for text in itertools.islice(itertools.cycle(texts), requests)]
    with LocalStack(models_dir, keyring_path) as stack:
        report = asyncio.run(send_traffic(stack.gateway_target, examples, concurrency=1))
        forced = examples[: max(50, requests // 10)]
        hinted = asyncio.run(send_traffic(stack.gateway_target, forced, concurrency=1, hint="cloud"))
    print(
        "end to end through the gateway, sequential single-row requests "
        f"({len(report.outcomes)} auto, {len(hinted.outcomes)} forced to cloud):"
    )
    print(f"{'path':<28}{'rows':>7}{'p50 ms':>9}{'p99 ms':>9}")
    paths = {
        "edge (auto)": [o.latency_ms for o in report.outcomes if o.tier == "edge"],
        "cloud (auto, escalated)": [o.latency_ms for o in report.outcomes if o.tier == "cloud"],
        "cloud (client hint)": [o.latency_ms for o in hinted.outcomes],
    }
    for name, latencies in paths.items():
        if latencies:
            print(f"{name:<28}{len(latencies):>7}{percentile(latencies, 0.5):>9.2f}{percentile(latencies, 0.99):>9.2f}")
    edge_path, cloud_path = paths["edge (auto)"], paths["cloud (client hint)"]
    if edge_path and cloud_path:
        print(f"ratio: cloud-path/edge-path p50 {percentile(cloud_path, 0.5) / percentile(edge_path, 0.5):.1f}x")
    return 0 if not report.errors and not hinted.errors else 1
