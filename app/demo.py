"""`make run`: build models if missing, start both tiers on loopback, replay held-out traffic, print a summary.

Two models are served from one repository: the built-in text model (product-category) and a small tensor model
on generated numeric features (purchase-propensity, DEMO DATA), each with its own tiers and escalation share.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.constants import (
    HINT_PARAMETER,
    INPUT_DATATYPE,
    INPUT_NAME,
    LABEL_OUTPUT,
    MODEL_NAME,
    REASONS_PARAMETER,
    TIER_OUTPUT,
)
from tiergate.manifest import MANIFEST_NAME, Manifest, load_manifest
from training.measure import percentile


class ServerProcess:
    """A `tiergate serve ...` child process bound to a free loopback port."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        startup_timeout_s: float = 120.0,
        log_path: Path | None = None,
        cli_options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`env` adds to (or overrides) the environment the server inherits from this process."""
        self._workdir = tempfile.TemporaryDirectory(prefix="tiergate-")
        port_file = Path(self._workdir.name) / "port"
        self.log_path = log_path or Path(self._workdir.name) / "server.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "app.cli", *cli_options, "serve", *args]
        command += ["--port", "0", "--metrics-port", "0", "--port-file", str(port_file)]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + startup_timeout_s
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{' '.join(args[:1])} server exited early:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{' '.join(args[:1])} server did not start within {startup_timeout_s}s")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text(encoding="utf-8"))
        self.port, self.metrics_port = int(ports["port"]), int(ports["metrics_port"])
        self.target = f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (drain, then stop), escalating to SIGKILL after `timeout_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._workdir.cleanup()
        return self.process.returncode


def wait_serving(target: str, timeout_s: float = 30.0, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Block until the server at `target` reports SERVING on grpc.health.v1 (over TLS with `credentials`)."""
    deadline = time.monotonic() + timeout_s
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} is not SERVING after {timeout_s}s")
            time.sleep(0.1)


def hop_credentials(keys_dir: Path) -> grpc.ChannelCredentials:
    """The gateway's side of the mutual TLS the cloud tier requires, from a key directory."""
    from tiergate.keys import CA_CERT, GATEWAY_CERT, GATEWAY_KEY

    return grpc.ssl_channel_credentials(
        root_certificates=(keys_dir / CA_CERT).read_bytes(),
        private_key=(keys_dir / GATEWAY_KEY).read_bytes(),
        certificate_chain=(keys_dir / GATEWAY_CERT).read_bytes(),
    )


class LocalStack:
    """Cloud and gateway processes on loopback, wired together; exit codes are set once stopped.

    `cli_options` go before the subcommand of each server's command line (e.g. ``--log-format json``);
    `env` adds environment variables for both servers (e.g. the ``OTEL_*`` ones).
    """

    def __init__(
        self,
        models_dir: Path,
        keys_dir: Path,
        cli_options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`keys_dir` (from `ensure_keys`): mutual TLS on the hop, sealing keys, and the gateway's client tokens."""
        self._common = ["--models", str(models_dir), "--keys", str(keys_dir)]
        self._keys_dir = keys_dir
        self._cli_options = list(cli_options)
        self._env = dict(env or {})
        self.cloud_target = ""
        self.gateway_target = ""
        self.gateway_metrics_port = 0
        self.exit_codes: dict[str, int] = {}
        self._processes: dict[str, ServerProcess] = {}

    def __enter__(self) -> LocalStack:
        try:
            cloud = self._processes["cloud"] = ServerProcess(
                ["cloud", *self._common], cli_options=self._cli_options, env=self._env
            )
            gateway = self._processes["gateway"] = ServerProcess(
                ["gateway", *self._common, "--cloud", cloud.target], cli_options=self._cli_options, env=self._env
            )
            # The cloud serves mutual TLS only: ask it as the gateway would, with the gateway's certificate.
            wait_serving(cloud.target, credentials=hop_credentials(self._keys_dir))
            wait_serving(gateway.target)
        except BaseException:
            self._stop()
            raise
        self.cloud_target, self.gateway_target = cloud.target, gateway.target
        self.gateway_metrics_port = gateway.metrics_port
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        # The gateway first, so it never sees its cloud vanish mid-drain.
        for name in ("gateway", "cloud"):
            if name in self._processes:
                self.exit_codes[name] = self._processes.pop(name).stop()


@dataclass
class DemoOptions:
    models_dir: Path
    data_dir: Path | None
    keys_dir: Path
    requests: int = 3000
    concurrency: int = 8
    log_format: str = "plain"  # the servers' log files
    # The repository both servers serve (default: beside models_dir, `<models_dir>.repository`).
    repository: Path | None = None


@dataclass
class Outcome:
    tier: str
    reasons: str
    latency_ms: float
    correct: bool


@dataclass
class TrafficReport:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


@dataclass(frozen=True)
class TrafficCost:
    """What the gateway's cost counters say this traffic cost, tiered and sent all to the cloud."""

    spent: float
    cloud_only: float
    currency: str


def read_cost(metrics_port: int, host: str = "127.0.0.1") -> TrafficCost | None:
    """The gateway's `tiergate_cost_*_total` counters, summed over models; None without an endpoint."""
    if not metrics_port:
        return None
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode("utf-8")
    totals: dict[str, float] = {}
    currency = ""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("tiergate_cost_spent_total", "tiergate_cost_cloud_only_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                currency = sample.labels.get("currency", currency)
    if not totals:
        return None
    return TrafficCost(totals.get("tiergate_cost_spent_total", 0.0), totals["tiergate_cost_cloud_only_total"], currency)


def ensure_models(models_dir: Path, data_dir: Path | None) -> None:
    """Build the default model set when the directory has none (or one built from other data)."""
    manifest_path = models_dir / MANIFEST_NAME
    if manifest_path.exists():
        source = json.loads(manifest_path.read_text(encoding="utf-8")).get("data", {}).get("source", "")
        wanted = "demo" if data_dir is None else data_dir.name
        if (data_dir is None) == source.startswith("demo") and (data_dir is None or wanted in source):
            print(f"models: using {models_dir} (built from {source})")
            return
        print(f"models: {models_dir} was built from {source!r}, not {wanted!r}; rebuilding")
    from training.build import build_models

    print(f"models: building into {models_dir} from {'demo data' if data_dir is None else data_dir.name} ...")
    started = time.perf_counter()
    build_models(models_dir, data_dir=data_dir)
    print(f"models: built in {time.perf_counter() - started:.0f}s")


def ensure_repository(models_dir: Path, repository: Path) -> Path:
    """The repository the demo serves: the built-in model (a link to `models_dir`) and the purchase-propensity
    model, built from generated data on first use (seconds)."""
    from training import propensity

    repository.mkdir(parents=True, exist_ok=True)
    link = repository / MODEL_NAME
    target = os.path.relpath(models_dir.resolve(), repository.resolve())
    if link.is_symlink() and os.readlink(link) != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    if not (repository / propensity.NAME).is_dir():
        print(f"models: building {propensity.NAME} (DEMO DATA: generated user and item features) ...")
        started = time.perf_counter()
        propensity.build_propensity(repository)
        print(f"models: built {propensity.NAME} in {time.perf_counter() - started:.0f}s")
    return repository


def tensor_request(model: str, row: np.ndarray, name: str, hint: str | None = None) -> pb.ModelInferRequest:
    """One row of a tensor model, in typed contents."""
    request = pb.ModelInferRequest(model_name=model)
    if hint is not None:
        request.parameters[HINT_PARAMETER].string_param = hint
    tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, len(row)])
    tensor.contents.fp32_contents.extend(float(value) for value in row)
    return request


def single_row_request(text: str, hint: str | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    if hint is not None:
        request.parameters[HINT_PARAMETER].string_param = hint
    tensor = request.inputs.add(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=[1])
    tensor.contents.bytes_contents.append(text.encode("utf-8"))
    return request


async def send_traffic(
    target: str,
    examples: Sequence[tuple[Any, str]],
    concurrency: int,
    hint: str | None = None,
    token: str | None = None,
    build: Callable[[Any, str | None], pb.ModelInferRequest] = single_row_request,
) -> TrafficReport:
    """Send one single-row request per example (`build` makes it; default: a product name) with `concurrency`
    callers; bounded by the example count."""
    metadata = bearer(token)
    report = TrafficReport()
    queue: asyncio.Queue[tuple[Any, str]] = asyncio.Queue()
    for example in examples:
        queue.put_nowait(example)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def caller() -> None:
            while not queue.empty():
                text, label = queue.get_nowait()
                started = time.perf_counter()
                try:
                    reply = await stub.ModelInfer(build(text, hint), timeout=10.0, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    report.errors[error.code().name] += 1
                    continue
                latency_ms = (time.perf_counter() - started) * 1000.0
                outputs = {out.name: out for out in reply.outputs}
                predicted = outputs[LABEL_OUTPUT].contents.bytes_contents[0].decode()
                tier = outputs[TIER_OUTPUT].contents.bytes_contents[0].decode()
                reasons = json.loads(reply.parameters[REASONS_PARAMETER].string_param)[0]
                report.outcomes.append(Outcome(tier, reasons, latency_ms, predicted == label))

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        report.wall_s = time.perf_counter() - started
    return report


def _summary_row(name: str, group: Sequence[Outcome]) -> str:
    latencies = [o.latency_ms for o in group]
    accuracy = sum(o.correct for o in group) / len(group)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return f"{name:<8}{len(group):>7}{p50:>9.2f}{p99:>9.2f}{accuracy:>10.3f}"


def format_summary(report: TrafficReport, model: str = "") -> str:
    outcomes = report.outcomes
    total = len(outcomes) + sum(report.errors.values())
    lines = [
        *([f"--- model {model} ---"] if model else []),
        f"requests sent       {total} ({len(outcomes)} answered, errors: {dict(report.errors) or 'none'})",
        f"throughput          {len(outcomes) / report.wall_s:.0f} req/s over {report.wall_s:.1f}s",
    ]
    if not outcomes:
        return "\n".join(lines)
    by_tier: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_tier.setdefault(outcome.tier, []).append(outcome)
    edge_share = len(by_tier.get("edge", [])) / len(outcomes)
    lines.append(f"answered at edge    {edge_share:.1%}")
    reasons = Counter(reason for o in outcomes if o.reasons for reason in o.reasons.split("+"))
    lines.append("escalations         " + (", ".join(f"{r}={n}" for r, n in reasons.most_common()) or "none"))
    lines.append(f"{'tier':<8}{'rows':>7}{'p50 ms':>9}{'p99 ms':>9}{'accuracy':>10}")
    for tier, group in sorted(by_tier.items()):
        lines.append(_summary_row(tier, group))
    lines.append(_summary_row("all", outcomes))
    return "\n".join(lines)


def format_cost(cost: TrafficCost | None) -> str | None:
    """Cost of all the traffic, tiered vs cloud-only, at the prices in the gateway's cost settings."""
    if cost is None or cost.cloud_only <= 0:
        return None
    saved = 1.0 - cost.spent / cost.cloud_only
    return (
        f"cost (both models)  {cost.spent:.4f} {cost.currency} tiered vs {cost.cloud_only:.4f} {cost.currency} "
        f"cloud-only (saved {saved:.1%})"
    )


def _test_metrics_line(manifest: Manifest) -> str | None:
    """The build's held-out test numbers, the yardstick for the demo's own accuracy column."""
    test = manifest.metrics.get("test")
    if not isinstance(test, dict) or "cascade_accuracy" not in test:
        return None
    accuracies = ", ".join(
        f"{name} {test[key]:.3f}"
        for name, key in (
            ("edge int8", "edge_int8_accuracy"),
            ("cloud", "cloud_accuracy"),
            ("cascade", "cascade_accuracy"),
        )
    )
    routing = manifest.routing
    return (
        f"models: held-out test accuracy {accuracies}, escalating {test['escalation_rate']:.1%} "
        f"(threshold {routing.threshold:.3f} on {routing.signal})"
    )


DEMO_CLIENT = "demo"


def ensure_keys(directory: Path) -> str:
    """The demo's key directory (created on first use, as `tiergate keys init` would) and a fresh client token."""
    from tiergate.keys import TOKENS_FILE, ensure_key_dir
    from tiergate.tokens import TokenStore, add, revoke

    created = not directory.exists()
    ensure_key_dir(directory)
    if created:
        print(f"keys: created {directory} (development CA, mTLS certificates, sealing keyring, token file)")
    tokens = directory / TOKENS_FILE
    if TokenStore.load(tokens).get(DEMO_CLIENT) is not None:
        revoke(tokens, DEMO_CLIENT)  # a new token per run: the last run's is not kept anywhere
    return add(tokens, DEMO_CLIENT, ["*"])


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that presents `token`."""
    return None if token is None else (("authorization", f"Bearer {token}"),)


def run_demo(options: DemoOptions) -> int:
    from training import propensity
    from training.data import DEMO_SOURCE, heldout_examples

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"data: {DEMO_SOURCE} (generated)" if options.data_dir is None else f"data: {options.data_dir}")
    ensure_models(options.models_dir, options.data_dir)
    manifest = load_manifest(options.models_dir, verify=False)
    if (line := _test_metrics_line(manifest)) is not None:
        print(line)
    token = ensure_keys(options.keys_dir)
    heldout = heldout_examples(options.models_dir, options.data_dir)
    if not heldout:
        print("traffic: the held-out split is empty", file=sys.stderr)
        return 1
    # Replay the held-out rows in order, cycling when there are fewer rows than requests.
    examples = list(itertools.islice(itertools.cycle(heldout), options.requests))
    repository = ensure_repository(
        options.models_dir, options.repository or options.models_dir.with_name(f"{options.models_dir.name}.repository")
    )
    # The tensor model's traffic: fresh generated rows (another seed than its training and calibration rows).
    x, y = propensity.generate(max(1, options.requests // 3), seed=1234)
    shoppers = [(row, propensity.LABELS[int(label)]) for row, label in zip(x, y, strict=True)]

    def propensity_request(row: np.ndarray, hint: str | None) -> pb.ModelInferRequest:
        return tensor_request(propensity.NAME, row, propensity.INPUT_NAME, hint)

    with LocalStack(repository, options.keys_dir, ["--log-format", options.log_format]) as stack:
        print(f"servers: cloud on {stack.cloud_target}, gateway on {stack.gateway_target}")
        print(
            f"boundary: mutual TLS on the hop (development CA in {options.keys_dir}) under AES-256-GCM envelopes; "
            f"client token {DEMO_CLIENT!r} on the public port"
        )
        print(
            f"traffic: {len(examples)} requests over {len(heldout)} held-out rows of "
            f"{manifest.data.get('source')}, task {manifest.task}, {options.concurrency} callers"
        )
        print(
            f"traffic: {len(shoppers)} requests of {propensity.NAME}, one generated shopper and item per request "
            f"(DEMO DATA), {options.concurrency} callers"
        )
        report = asyncio.run(send_traffic(stack.gateway_target, examples, options.concurrency, token=token))
        tensor_report = asyncio.run(
            send_traffic(stack.gateway_target, shoppers, options.concurrency, token=token, build=propensity_request)
        )
        cost = read_cost(stack.gateway_metrics_port)
    print("=== Tiergate demo summary ===")
    print(format_summary(report, MODEL_NAME))
    print(format_summary(tensor_report, f"{propensity.NAME} (DEMO DATA)"))
    if (line := format_cost(cost)) is not None:
        print(line)
    print(f"servers stopped (gateway exit {stack.exit_codes['gateway']}, cloud exit {stack.exit_codes['cloud']})")
    reports = (report, tensor_report)
    return 0 if all(r.outcomes and not r.errors for r in reports) else 1
