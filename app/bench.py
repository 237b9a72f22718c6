"""`make bench`: edge INT8 vs FP32 vs cloud latency and size, per-tier latency through real servers, what tracing
costs the fast path, what sealing costs the gateway->cloud hop (plaintext and mutual TLS), grey-band hedging, and
the performance section (app/bench_perf.py: the floor, the fast path, the peers, cascade, cache, RSS), in one run."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import platform
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cryptography
import grpc
import onnxruntime
from cryptography.hazmat.backends.openssl import backend as cryptography_backend

from app.bench_perf import PerfOptions, bench_performance
from app.demo import LocalStack, bearer, ensure_keys, ensure_models, send_traffic, single_row_request
from app.otlp_sink import OtlpSink, ReceivedSpan
from cloud_runtime.model import CloudModel
from edge_runtime.model import EdgeModel
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.constants import TIER_OUTPUT
from tiergate.envelope import Keyring, Sealer
from tiergate.errors import SealError
from tiergate.manifest import EDGE_VARIANT_ROLES, load_manifest
from training.measure import Timing, percentile, time_calls

# Tracing cost: rounds sent before timing starts, the resource attribute naming the setup, the 0.1 target.
WARMUP_ROUNDS = 20
SETUP_ATTRIBUTE = "tiergate.bench.tracing"
OVERHEAD_TARGET = 0.10
GATEWAY_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# The sections `make bench` runs, in order; `--skip` leaves some out.
SECTIONS = ("tracing", "sealing", "hedging", "performance")


def run_bench(
    models_dir: Path,
    data_dir: Path | None,
    keys_dir: Path,
    requests: int,
    calls: int,
    skip: Sequence[str] = (),
    perf: PerfOptions | None = None,
) -> int:
    """Models, then end to end; then each of `SECTIONS` that `skip` does not name (`perf` bounds the last)."""
    from training.data import heldout_examples

    began = time.perf_counter()
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
    files = manifest.artifact_files()
    for variant in ("int8", "qdq", "fp32"):
        artifact = files[EDGE_VARIANT_ROLES[variant]]
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
            _size_mb(models_dir / files["cloud.onnx"].path),
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
    traced_ok = "tracing" in skip or bench_tracing_cost(models_dir, keys_dir, token, texts, rounds=requests)
    small, large = SEAL_SIZES
    sealing_calls = {small: max(50, requests // 2), large: max(20, requests // 5)}
    sealed_ok = "sealing" in skip or bench_sealing_cost(keys_dir, texts, sealing_calls, models_dir=models_dir)
    hedged_ok = "hedging" in skip or _bench_hedging(models_dir, data_dir, keys_dir, requests)
    perf_ok = "performance" in skip or bench_performance(models_dir, data_dir, keys_dir, perf or PerfOptions())
    print(f"bench: {time.perf_counter() - began:.0f} s in all (skipped: {', '.join(skip) or 'none'})")
    ok = not report.errors and not hinted.errors and traced_ok and sealed_ok and hedged_ok and perf_ok
    return 0 if ok else 1


def _bench_hedging(models_dir: Path, data_dir: Path | None, keys_dir: Path, requests: int) -> bool:
    from app.bench_hedging import bench_hedging
    from training.data import heldout_examples

    with LocalStack(models_dir, keys_dir) as stack:
        return bench_hedging(
            models_dir, keys_dir, stack.cloud_target, heldout_examples(models_dir, data_dir), max(100, requests // 10)
        )


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
            request = single_row_request(texts[index % len(texts)], hint="edge")
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


# Sealing cost: the payload sizes (bytes of request text per call), the share target at the smallest, the hops.
SEAL_SIZES = (1024, 64 * 1024)
SEAL_TARGET = 0.03
SEAL_HOPS = ("plaintext", "mutual TLS")
# The hop as served: the cloud model answering, plaintext and mutual TLS (at the smallest payload only).
SERVED_HOPS = ("plain + model", "mTLS + model")
# Timed calls on the served hops at most: each runs the cloud model on a KiB of names (tens of ms), and the share
# it measures is far from the target, so more calls would add minutes to `make bench` and nothing to the verdict.
SERVED_CALLS = 30
# The four crypto steps of one call, in the order they run.
SEAL_STEPS = ("client seal", "server open", "server seal", "client open")


@dataclass(frozen=True)
class SealedCall:
    """One timed hop call (seconds): the whole round trip and the four crypto steps inside it (`SEAL_STEPS`)."""

    round_trip: float
    steps: tuple[float, float, float, float]

    @property
    def crypto(self) -> float:
        return sum(self.steps)


class EchoCloudServicer(cloud_pb2_grpc.CloudInferenceServicer):
    """The real `CloudInference` service minus the model (or with it): opens the request, seals one prediction per
    text (whose label is that text, a response about the request's size; or the cloud model's answer), and keeps
    its open/seal times for the caller."""

    def __init__(self, sealer: Sealer, model: CloudModel | None = None) -> None:
        self._sealer = sealer
        self._model = model
        # (server open, server seal) seconds per request id, taken by the caller after each call.
        self.timings: dict[str, tuple[float, float]] = {}
        # What the auth context showed, while `inspect` is set: (transport security, peer common name).
        self.inspect = False
        self.peers: set[tuple[str, str]] = set()

    async def Infer(
        self, request: cloud_pb2.Envelope, context: grpc.aio.ServicerContext[cloud_pb2.Envelope, cloud_pb2.Envelope]
    ) -> cloud_pb2.Envelope:
        if self.inspect:
            auth = context.auth_context()
            security = b"".join(auth.get("transport_security_type", [b"none"])).decode()
            self.peers.add((security, b",".join(auth.get("x509_common_name", [b"-"])).decode()))
        started = time.perf_counter()
        plain = self._sealer.open(request, cloud_pb2.CloudInferRequest, direction="request")
        opened = time.perf_counter()
        if self._model is not None:
            scored = self._model.predict(list(plain.texts))
            predictions = [
                cloud_pb2.CloudPrediction(label=self._model.labels[int(i)], signal=float(s), probability=float(p))
                for i, p, s in zip(scored.label_index, scored.probability, scored.signal, strict=True)
            ]
        else:
            predictions = [cloud_pb2.CloudPrediction(label=t, signal=0.5, probability=0.5) for t in plain.texts]
        response = cloud_pb2.CloudInferResponse(model_version="bench-echo", predictions=predictions)
        sealing = time.perf_counter()
        sealed = self._sealer.seal(response, request_id=request.request_id, direction="response")
        self.timings[request.request_id] = (opened - started, time.perf_counter() - sealing)
        return sealed


def seal_payload(texts: Sequence[str], size: int) -> cloud_pb2.CloudInferRequest:
    """A hop request whose texts (taken in turn from `texts`, the last one cut) add up to `size` UTF-8 bytes."""
    if not texts or not any(texts):
        raise ValueError("the sealing-cost payloads need at least one non-empty text")
    chosen: list[str] = []
    total = 0
    for text in itertools.cycle(t for t in texts if t):
        piece = text.encode("utf-8")[: size - total].decode("utf-8", errors="ignore")
        if not piece:
            break
        chosen.append(piece)
        total += len(piece.encode("utf-8"))
        if total >= size:
            break
    return cloud_pb2.CloudInferRequest(model_name="cloud", texts=chosen, gateway_request_id="bench")


def _kib(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


async def _measure_sealing(
    keys_dir: Path,
    keyring: Keyring,
    payloads: dict[int, cloud_pb2.CloudInferRequest],
    calls: dict[int, int],
    warmup: int,
    model: CloudModel | None = None,
) -> tuple[dict[tuple[str, int], list[SealedCall]], Counter[str], EchoCloudServicer]:
    from tiergate.keys import CA_CERT, CLOUD_CERT, CLOUD_KEY, GATEWAY_CERT, GATEWAY_KEY
    from tiergate.settings import TlsSettings
    from tiergate.tls import channel_credentials, channel_options, server_credentials

    client, servicer = Sealer(keyring), EchoCloudServicer(Sealer(keyring))
    server_tls = TlsSettings(
        ca=keys_dir / CA_CERT, cert=keys_dir / CLOUD_CERT, key=keys_dir / CLOUD_KEY, require_client_cert=True
    )
    client_tls = TlsSettings(
        ca=keys_dir / CA_CERT, cert=keys_dir / GATEWAY_CERT, key=keys_dir / GATEWAY_KEY, server_name="localhost"
    )
    credentials = server_credentials(server_tls)
    assert credentials is not None
    server = grpc.aio.server()
    cloud_pb2_grpc.add_CloudInferenceServicer_to_server(servicer, server)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    tls_port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    # The served hop: the same, with the cloud model answering, on a mutual-TLS server of its own.
    served = EchoCloudServicer(Sealer(keyring), model)
    served_server = grpc.aio.server()
    cloud_pb2_grpc.add_CloudInferenceServicer_to_server(served, served_server)
    served_credentials = server_credentials(server_tls)  # a credentials object serves one server
    assert served_credentials is not None
    served_port = served_server.add_secure_port("127.0.0.1:0", served_credentials)
    served_plain_port = served_server.add_insecure_port("127.0.0.1:0")
    try:
        await served_server.start()
    except BaseException:
        await server.stop(None)
        raise
    servicers = {"plaintext": servicer, "mutual TLS": servicer, **dict.fromkeys(SERVED_HOPS, served)}
    results: dict[tuple[str, int], list[SealedCall]] = {(hop, size): [] for size in payloads for hop in SEAL_HOPS}
    if model is not None:
        for hop in SERVED_HOPS:
            results[(hop, min(payloads))] = []
    errors: Counter[str] = Counter()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}") as plain_channel,
            grpc.aio.secure_channel(
                f"127.0.0.1:{tls_port}", channel_credentials(client_tls), options=channel_options(client_tls)
            ) as tls_channel,
            grpc.aio.secure_channel(
                f"127.0.0.1:{served_port}", channel_credentials(client_tls), options=channel_options(client_tls)
            ) as served_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{served_plain_port}") as served_plain_channel,
        ):
            stubs = {
                "plaintext": cloud_pb2_grpc.CloudInferenceStub(plain_channel),
                "mutual TLS": cloud_pb2_grpc.CloudInferenceStub(tls_channel),
                SERVED_HOPS[0]: cloud_pb2_grpc.CloudInferenceStub(served_plain_channel),
                SERVED_HOPS[1]: cloud_pb2_grpc.CloudInferenceStub(served_channel),
            }
            combos = list(results)

            async def call(hop: str, size: int) -> SealedCall | None:
                request_id = uuid.uuid4().hex
                try:
                    started = time.perf_counter()
                    envelope = client.seal(payloads[size], request_id=request_id, direction="request")
                    sealed = time.perf_counter()
                    reply = await stubs[hop].Infer(envelope, timeout=10.0)
                    received = time.perf_counter()
                    response = client.open(reply, cloud_pb2.CloudInferResponse, direction="response")
                    done = time.perf_counter()
                except grpc.aio.AioRpcError as error:
                    errors[f"{hop}: {error.code().name}"] += 1
                    return None
                except SealError as error:
                    errors[f"{hop}: seal {error.cause}"] += 1
                    return None
                server_open, server_seal = servicers[hop].timings.pop(request_id)
                if reply.request_id != request_id or len(response.predictions) != len(payloads[size].texts):
                    errors[f"{hop}: wrong answer"] += 1
                    return None
                return SealedCall(done - started, (sealed - started, server_open, server_seal, done - received))

            servicer.inspect = True
            for hop in SEAL_HOPS:  # the handshakes, and what each port's auth context shows
                await call(hop, min(payloads))
            servicer.inspect = False
            if model is not None:
                for hop in SERVED_HOPS:
                    await call(hop, min(payloads))
            for index in range(-warmup, max(calls.values())):
                for turn in range(len(combos)):
                    hop, size = combos[(index + turn) % len(combos)]
                    if index >= (min(calls[size], SERVED_CALLS) if hop in SERVED_HOPS else calls[size]):
                        continue
                    timed = await call(hop, size)
                    if timed is not None and index >= 0:
                        results[(hop, size)].append(timed)
    finally:
        await server.stop(None)
        await served_server.stop(None)
    return results, errors, servicer


def sealing_cost_lines(results: dict[tuple[str, int], list[SealedCall]]) -> list[str]:
    """The table, ratios and verdict of the sealing-cost section; `results` holds (hop, payload bytes) calls."""
    us = 1e6
    lines = [
        f"{'hop':<15}{'payload':>8}{'calls':>7}{'rt p50 us':>11}{'crypto p50 us':>15}{'share p50':>11}"
        f"{'c-seal':>8}{'s-open':>8}{'s-seal':>8}{'c-open':>8}"
    ]
    round_trips: dict[tuple[str, int], float] = {}
    shares: dict[tuple[str, int], float] = {}
    for (hop, size), timed in results.items():
        round_trips[(hop, size)] = percentile([c.round_trip for c in timed], 0.5)
        shares[(hop, size)] = percentile([c.crypto / c.round_trip for c in timed], 0.5)
        steps = "".join(f"{percentile([c.steps[i] for c in timed], 0.5) * us:>8.1f}" for i in range(len(SEAL_STEPS)))
        lines.append(
            f"{hop:<15}{_kib(size):>8}{len(timed):>7}{round_trips[(hop, size)] * us:>11.1f}"
            f"{percentile([c.crypto for c in timed], 0.5) * us:>15.1f}{shares[(hop, size)]:>11.2%}{steps}"
        )
    lines.append(
        "(rt: client seal + call + client open; crypto: the four Sealer calls c-seal, s-open, s-seal, c-open "
        "(protobuf (de)serialisation + AES-256-GCM each) summed, their p50s on the right; share: median over calls "
        "of crypto/rt; + model: the hop with the cloud model answering)"
    )
    sizes = sorted({size for _, size in results})
    tls, plain = SEAL_HOPS[1], SEAL_HOPS[0]
    lines.append(
        f"ratios: {tls}/{plain} rt p50 "
        + ", ".join(f"{_kib(size)} {round_trips[(tls, size)] / round_trips[(plain, size)]:.2f}x" for size in sizes)
    )
    small = sizes[0]
    verdicts = ", ".join(f"{hop} {shares[(hop, small)]:.2%}" for hop in SEAL_HOPS)
    lines.append(
        f"bare hop (echo, no model; the transport floor): {_kib(small)} share {verdicts}: "
        + ("<= " if all(shares[(hop, small)] <= SEAL_TARGET for hop in SEAL_HOPS) else "over ")
        + f"{SEAL_TARGET:.0%}"
    )
    served = {hop: shares[(hop, small)] for hop in SERVED_HOPS if (hop, small) in shares}
    if served:
        lines.append(
            f"target: {_kib(small)} share <= {SEAL_TARGET:.0%} of the hop as served: "
            + ", ".join(f"{hop} {share:.2%}" for hop, share in served.items())
            + (
                "; met"
                if max(served.values()) <= SEAL_TARGET
                else "; NOT met (reported; a bench run does not fail on it)"
            )
        )
    return lines


def bench_sealing_cost(
    keys_dir: Path,
    texts: Sequence[str],
    calls: dict[int, int],
    warmup: int = WARMUP_ROUNDS,
    models_dir: Path | None = None,
) -> bool:
    """Share of the hop's round trip spent sealing and opening, plaintext and mutual-TLS hops side by side, per
    payload size in `calls` (bytes of text -> timed calls), and at the smallest size on the hop as served (the
    cloud model of `models_dir` answering); False on hop or envelope errors."""
    from tiergate.keys import KEYRING_FILE, ensure_key_dir, load_keyring

    keyring = load_keyring(ensure_key_dir(keys_dir) / KEYRING_FILE)
    payloads = {size: seal_payload(texts, size) for size in sorted(calls)}
    envelope_bytes = {
        size: Sealer(keyring).seal(p, request_id=uuid.uuid4().hex, direction="request").ByteSize()
        for size, p in payloads.items()
    }
    model = CloudModel.load(models_dir) if models_dir is not None else None
    try:
        results, errors, servicer = asyncio.run(_measure_sealing(keys_dir, keyring, payloads, calls, warmup, model))
    finally:
        if model is not None:
            model.close()
    rounds = max(calls.values())
    print(
        f"sealing cost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, grpcio {grpc.__version__}"
        f", cryptography {cryptography.__version__} ({cryptography_backend.openssl_version_text()}); one in-process "
        "grpc.aio CloudInference server on 127.0.0.1 with a plaintext port and a mutual-TLS port (key dir "
        f"{keys_dir}: cloud server certificate, gateway client certificate required; ports seen as "
        f"{', '.join(f'{s}/{cn}' for s, cn in sorted(servicer.peers))}), client and server on one event loop; "
        "the servicer opens the request envelope, seals an echo response (one prediction per text, no model); "
        + (
            "the hop as served (smallest payload only): a second server, plaintext and mutual-TLS ports, whose "
            "servicer runs the cloud model on the texts, in the event loop as the echo does; "
            if model is not None
            else ""
        )
        + "AES-256-GCM Sealer both ways, key from the key directory; payloads "
        + ", ".join(
            f"{_kib(size)} ({len(p.texts)} texts, request envelope {envelope_bytes[size]} B)"
            for size, p in payloads.items()
        )
        + f"; {rounds} rounds (+{warmup} warm-up) over the {len(results)} hop x payload pairs, first rotating, "
        f"sequential; timed calls: "
        + ", ".join(f"{_kib(size)} {n} per hop" for size, n in sorted(calls.items()))
        + (f", the hop as served {min(calls[min(calls)], SERVED_CALLS)} per hop" if model is not None else "")
    )
    for line in sealing_cost_lines(results):
        print(line)
    if errors:
        print(f"sealing cost: errors {dict(errors)}")
    return not errors
