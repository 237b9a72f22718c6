"""The load tests' harness: servers in processes of their own (so one can be killed or sent SIGTERM), a paced
open-loop driver that records every request's outcome, and the figures each test reports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT
from tiergate.constants import DEGRADED_PARAMETER, REASONS_PARAMETER, TIER_OUTPUT
from training.measure import percentile

# Where the figures of each load test go, one JSON object per line (besides the LOAD lines printed).
REPORT_ENV = "TIERGATE_LOAD_REPORT"


class ServerProcess:
    """`tiergate serve gateway|cloud` in its own process, on a port the OS picks (or the one given)."""

    def __init__(self, kind: str, args: Sequence[str], env: Mapping[str, str], work: Path, port: int = 0) -> None:
        self.kind = kind
        self.args = list(args)
        self.env = {**os.environ, **env}
        self.port_file = work / f"{kind}-{time.monotonic_ns()}.json"
        self.port = port
        self.metrics_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = work / f"{kind}.log"

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        command = [sys.executable, "-m", "app.cli", "serve", self.kind, *self.args]
        command += ["--port", str(self.port), "--port-file", str(self.port_file), "--metrics-port", "0"]
        self.port_file.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log)
        until = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"{self.kind} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = int(ports["port"]), int(ports["metrics_port"])
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code (the process drains first)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for server in reversed(servers):
            server.stop()


@dataclass
class Outcome:
    """One request: when it went out and came back (loop seconds), its status, and what each row said."""

    sent: float
    done: float
    code: str = "OK"
    details: str = ""
    tiers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    degraded: bool = False
    version: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1000.0


def text_request(texts: Sequence[str], **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="product-category")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(text.encode() for text in texts)
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


async def drive(
    target: str,
    requests: Sequence[pb.ModelInferRequest],
    *,
    rate_per_s: float,
    concurrency: int,
    timeout_s: float = 10.0,
    on_sent: Callable[[int], None] | None = None,
    decode: bool = True,
) -> list[Outcome]:
    """Send `requests` paced at `rate_per_s` (request i goes out at i / rate), at most `concurrency` at a time;
    every outcome recorded, none raised. `decode=False` keeps only status and time (a lighter client)."""
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome | None] = [None] * len(requests)
    gate = asyncio.Semaphore(concurrency)
    start = loop.time() + 0.05
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(index: int) -> None:
            await asyncio.sleep(max(0.0, start + index / rate_per_s - loop.time()))
            async with gate:
                if on_sent is not None:
                    on_sent(index)
                sent = loop.time()
                try:
                    reply = await stub.ModelInfer(requests[index], timeout=timeout_s)
                except grpc.aio.AioRpcError as error:
                    outcomes[index] = Outcome(sent, loop.time(), error.code().name, error.details() or "")
                    return
                if not decode:
                    outcomes[index] = Outcome(sent, loop.time())
                    return
                outputs = {o.name: o for o in reply.outputs}
                outcomes[index] = Outcome(
                    sent,
                    loop.time(),
                    tiers=[t.decode() for t in outputs[TIER_OUTPUT].contents.bytes_contents],
                    reasons=json.loads(reply.parameters[REASONS_PARAMETER].string_param),
                    degraded=reply.parameters[DEGRADED_PARAMETER].bool_param,
                    version=reply.model_version,
                )

        await asyncio.gather(*(one(index) for index in range(len(requests))))
    return [outcome for outcome in outcomes if outcome is not None]


def p(outcomes: Sequence[Outcome], q: float) -> float:
    return percentile([o.latency_ms for o in outcomes], q)


def report(name: str, **figures: object) -> None:
    """Print one LOAD line and append the figures to the report file, if one is named."""
    line = " ".join(
        f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}" for key, value in figures.items()
    )
    print(f"\nLOAD {name}: {line}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": name, **figures}) + "\n")
