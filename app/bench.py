"""`make bench`: edge INT8 vs FP32 vs cloud latency and size, per-tier latency through real servers, then what
tracing costs the fast path, in one run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import onnxruntime

from app.demo import LocalStack, _request, bearer, ensure_keys, ensure_models, send_traffic
from app.otlp_sink import OtlpSink, ReceivedSpan
from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.constants import TIER_OUTPUT
from tiergate.manifest import load_manifest
from training.measure import Timing, percentile, time_calls

# Tracing cost: rounds sent before timing starts, the resource attribute naming the setup, the 0.1 target.
WARMUP_ROUNDS = 20
SETUP_ATTRIBUTE = "tiergate.bench.tracing"
OVERHEAD_TARGET = 0.10
GATEWAY_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def run_bench(models_dir: Path, data_dir: Path | None, keys_dir: Path, requests: int, calls: int) -> int:
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

    token = ensure_keys(keys_dir)
    examples = [(text, "") for text in itertools.islice(itertools.cycle(texts), requests)]
    with LocalStack(models_dir, keys_dir) as stack:
        report = asyncio.run(send_traffic(stack.gateway_target, examples, concurrency=1, token=token))
        forced = examples[: max(50, requests // 10)]
        hinted = asyncio.run(send_traffic(stack.gateway_target, forced, concurrency=1, hint="cloud", token=token))
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
    traced_ok = bench_tracing_cost(models_dir, keys_dir, token, texts, rounds=requests)
    return 0 if not report.errors and not hinted.errors and traced_ok else 1


@dataclass(frozen=True)
class TracingSetup:
    """One way of running both servers for the tracing-cost section: a name and the `OTEL_*` it sets."""

    name: str
    env: dict[str, str]


def tracing_setups(endpoint: str) -> list[TracingSetup]:
    """Tracing off, on at always_on (1.0), on at parentbased_traceidratio 0.1; the traced two export to `endpoint`."""
    # Empty values mask whatever OTEL_* the bench itself runs under (tracing reads an empty variable as unset).
    masked = dict.fromkeys(
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME"), ""
    )

    def traced(name: str, sampler: str, arg: str) -> TracingSetup:
        return TracingSetup(
            name,
            {
                **masked,
                "OTEL_SDK_DISABLED": "false",
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_TRACES_SAMPLER": sampler,
                "OTEL_TRACES_SAMPLER_ARG": arg,
                # Tells the sink's spans apart by setup.
                "OTEL_RESOURCE_ATTRIBUTES": f"{SETUP_ATTRIBUTE}={name}",
            },
        )

    off = TracingSetup("off", {**masked, "OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    return [off, traced("on 1.0", "always_on", ""), traced("on 0.1", "parentbased_traceidratio", "0.1")]


@dataclass
class Interleaved:
    """Latencies (ms) per round, one per setup in setup order (None: that request failed), and what went wrong."""

    rounds: list[list[float | None]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    not_edge: int = 0


async def send_interleaved(
    targets: Sequence[str], texts: Sequence[str], rounds: int, warmup: int = WARMUP_ROUNDS, token: str | None = None
) -> Interleaved:
    """`warmup` + `rounds` rounds of one sequential edge-hinted request to each target, the first target rotating."""
    result = Interleaved()
    async with contextlib.AsyncExitStack() as exits:
        stubs = [
            pb_grpc.GRPCInferenceServiceStub(await exits.enter_async_context(grpc.aio.insecure_channel(target)))
            for target in targets
        ]
        for index in range(-warmup, rounds):
            request = _request(texts[index % len(texts)], hint="edge")
            latencies: list[float | None] = [None] * len(stubs)
            for turn in range(len(stubs)):
                which = (index + turn) % len(stubs)
                started = time.perf_counter()
                try:
                    reply = await stubs[which].ModelInfer(request, timeout=10.0, metadata=bearer(token))
                except grpc.aio.AioRpcError as error:
                    result.errors[error.code().name] += 1
                    continue
                latencies[which] = (time.perf_counter() - started) * 1000.0
                tier = next(out for out in reply.outputs if out.name == TIER_OUTPUT).contents.bytes_contents[0]
                result.not_edge += tier != b"edge"
            if index >= 0:
                result.rounds.append(latencies)
    return result


def tracing_cost_lines(
    setups: Sequence[TracingSetup], measured: Interleaved, spans: Sequence[ReceivedSpan], sent: int
) -> list[str]:
    """The table and verdict of the tracing-cost section; the first setup is the tracing-off baseline."""
    columns: list[list[float]] = [[] for _ in setups]
    ratios: list[list[float]] = [[] for _ in setups]  # per round, against the same round's tracing-off request
    for latencies in measured.rounds:
        for i, latency in enumerate(latencies):
            if latency is not None:
                columns[i].append(latency)
                if latencies[0]:
                    ratios[i].append(latency / latencies[0])
    base = percentile(columns[0], 0.5)
    lines = [
        f"{'tracing':<10}{'rows':>7}{'p50 ms':>9}{'p99 ms':>9}{'p50/off':>9}{'paired':>8}{'spans':>8}{'traced':>8}"
        f"{'sampled':>9}"
    ]
    p50s: list[float] = []
    for setup, column, paired in zip(setups, columns, ratios, strict=True):
        p50s.append(percentile(column, 0.5))
        mine = [s for s in spans if s.resource.get(SETUP_ATTRIBUTE) == setup.name]
        # A request's trace arrived if its gateway server span did (the spans also hold startup work).
        traced = sum(s.name == GATEWAY_INFER and s.service == "tiergate-gateway" for s in mine)
        lines.append(
            f"{setup.name:<10}{len(column):>7}{p50s[-1]:>9.3f}{percentile(column, 0.99):>9.3f}{p50s[-1] / base:>8.3f}x"
            f"{percentile(paired, 0.5):>7.3f}x{len(mine):>8}{traced:>8}{traced / sent:>9.1%}"
        )
    lines.append(
        "(p50/off: this p50 over the tracing-off p50; paired: median over rounds of this request's latency over "
        f"the same round's tracing-off one; traced: requests whose trace reached the sink, of {sent} sent)"
    )
    overhead = p50s[-1] / base - 1.0
    verdict = "met" if overhead <= OVERHEAD_TARGET else "NOT met (reported; a bench run does not fail on it)"
    lines.append(
        f"target: {setups[-1].name} p50 overhead <= {OVERHEAD_TARGET:.0%} vs off: {overhead:+.1%} "
        f"({(p50s[-1] - base) * 1000.0:+.0f} us), {verdict}"
    )
    return lines


def bench_tracing_cost(models_dir: Path, keys_dir: Path, token: str, texts: Sequence[str], rounds: int) -> bool:
    """Fast-path latency with tracing off, on at 1.0 and on at 0.1, side by side; False on request errors."""
    with OtlpSink() as sink:
        setups = tracing_setups(sink.endpoint)
        print(
            f"tracing cost: {len(setups)} stacks running at once ({', '.join(s.name for s in setups)}: "
            "OTEL_SDK_DISABLED=true; always_on; parentbased_traceidratio 0.1), both tiers of the traced ones "
            f"exporting over OTLP/gRPC (batch processor) to an in-process sink on {sink.endpoint}; "
            f"{rounds} rounds (+{WARMUP_ROUNDS} warm-up) of one single-row tier=edge request to each stack in turn, "
            f"sequential, {rounds * len(setups)} timed requests; spans counted after the servers flush on stop"
        )
        with contextlib.ExitStack() as exits:
            stacks = [exits.enter_context(LocalStack(models_dir, keys_dir, env=s.env)) for s in setups]
            targets = [stack.gateway_target for stack in stacks]
            measured = asyncio.run(send_interleaved(targets, texts, rounds, token=token))
    for line in tracing_cost_lines(setups, measured, sink.spans, sent=rounds + WARMUP_ROUNDS):
        print(line)
    if measured.errors or measured.not_edge:
        print(f"tracing cost: errors {dict(measured.errors) or 'none'}, {measured.not_edge} answers not from the edge")
    return not measured.errors
