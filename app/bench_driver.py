"""The performance section's load driver: unmodified tritonclient.grpc (aio) calling OIP servers; prints JSON.

It runs in a process of its own, because tritonclient's protobuf descriptors clash with the project's stubs in one
process. Every server is called the same way: one client per target, `concurrency` callers on it, `batch` texts per
call taken in order from the text file (fresh texts on every call until the file runs out, then it cycles), the
runs of each mode interleaved over the targets so machine noise falls on all of them alike.

    python -m app.bench_driver --texts FILE --target NAME=HOST:PORT[?KEY=VALUE&...] --run sequential \
        --run concurrent-16 --run batch-32 [--calls N] [--seconds S] [--warmup N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A caller's token, when set, goes in every call's headers (servers without client auth ignore it).
TOKEN_ENV = "TIERGATE_TOKEN"
MODEL = "product-category"
# Concurrency of the batch runs, and the count bound of the time-bounded (concurrent and batch) runs.
BATCH_CONCURRENCY = 16
MAX_CONCURRENT_CALLS = 200_000
WARMUP_PREFIX = "warm-up "


@dataclass(frozen=True)
class Target:
    """One server to call: a name for the report, its address, and string parameters sent with every call."""

    name: str
    url: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One measurement: `concurrency` callers, `batch` rows per call; a sequential run is bounded by calls too."""

    mode: str
    concurrency: int
    batch: int

    @property
    def sequential(self) -> bool:
        return self.concurrency == 1


def parse_target(spec: str) -> Target:
    """`NAME=HOST:PORT[?KEY=VALUE&...]`."""
    name, sep, rest = spec.partition("=")
    url, _, query = rest.partition("?")
    if not sep or not name or ":" not in url:
        raise argparse.ArgumentTypeError(f"a target is NAME=HOST:PORT[?KEY=VALUE&...], got {spec!r}")
    parameters: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"a target parameter is KEY=VALUE, got {pair!r} in {spec!r}")
        parameters[key] = value
    return Target(name, url, parameters)


def parse_run(spec: str) -> Run:
    """`sequential` (1 caller, 1 row), `concurrent-C` (C callers, 1 row), `batch-B` (16 callers, B rows)."""
    if spec == "sequential":
        return Run(spec, 1, 1)
    kind, _, number = spec.partition("-")
    if kind in ("concurrent", "batch") and number.isdigit() and int(number) > 0:
        count = int(number)
        return Run(spec, count, 1) if kind == "concurrent" else Run(spec, BATCH_CONCURRENCY, count)
    raise argparse.ArgumentTypeError(f"a run is sequential, concurrent-C or batch-B, got {spec!r}")


def parse_pid(spec: str) -> tuple[str, int]:
    """`NAME=PID`: the server process behind target NAME, whose CPU time each run reads."""
    name, _, pid = spec.partition("=")
    if not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"a pid is NAME=PID, got {spec!r}")
    return name, int(pid)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and all its threads so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.bench_driver", description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=Path, required=True, help="UTF-8 file, one text per line")
    parser.add_argument("--target", type=parse_target, action="append", required=True, dest="targets")
    parser.add_argument("--run", type=parse_run, action="append", required=True, dest="runs")
    parser.add_argument(
        "--pid", type=parse_pid, action="append", default=[], dest="pids", help="NAME=PID: report its CPU per call"
    )
    parser.add_argument("--calls", type=int, default=1000, help="timed calls of a sequential run (at most)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds of a run (at most)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls before each run (times callers)")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout of one call, seconds")
    return parser


def summarise(latencies_ms: Sequence[float], rows: int, wall_s: float) -> dict[str, float | None]:
    """p50/p99/mean (nearest rank), req/s and rows/s of one run; None where nothing was answered."""
    if not latencies_ms:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "req_per_s": None, "rows_per_s": None}
    ordered = sorted(latencies_ms)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50_ms": rank(0.5),
        "p99_ms": rank(0.99),
        "mean_ms": sum(ordered) / len(ordered),
        "req_per_s": len(ordered) / wall_s if wall_s > 0 else None,
        "rows_per_s": rows / wall_s if wall_s > 0 else None,
    }


class TextStream:
    """The next `batch` texts of the file, in order, wrapping around at its end."""

    def __init__(self, texts: Sequence[str]) -> None:
        if not texts:
            raise ValueError("the text file has no texts")
        self._texts = list(texts)
        self._next = 0

    def __len__(self) -> int:
        return len(self._texts)

    def take(self, batch: int) -> list[str]:
        chosen = []
        for _ in range(batch):
            chosen.append(self._texts[self._next])
            self._next = (self._next + 1) % len(self._texts)
        return chosen

    def rewind(self, position: int) -> None:
        self._next = position % len(self._texts)

    @property
    def position(self) -> int:
        return self._next


async def measure(
    client: Any, target: Target, run: Run, stream: TextStream, args: argparse.Namespace, pid: int | None = None
) -> dict[str, Any]:
    """One run against one target: warm-up (prefixed texts, never the timed ones), then the timed calls."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else None
    parameters: dict[str, Any] = dict(target.parameters) or {}
    latencies: list[float] = []
    hits: list[int] = []
    rows_answered = 0
    errors: Counter[str] = Counter()

    async def call(texts: list[str]) -> tuple[float, int, int] | None:
        tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=np.object_))
        started = time.perf_counter()
        try:
            result = await client.infer(
                MODEL, [tensor], headers=headers, parameters=parameters or None, client_timeout=args.timeout
            )
        except InferenceServerException as error:
            errors[str(error.status())] += 1
            return None
        elapsed = (time.perf_counter() - started) * 1000.0
        response = result.get_response()
        answered = int(response.outputs[0].shape[0]) if response.outputs and response.outputs[0].shape else 0
        if answered != len(texts):
            errors["wrong row count"] += 1
            return None
        cache_hits = response.parameters["cache_hits"].int64_param if "cache_hits" in response.parameters else 0
        return elapsed, answered, int(cache_hits)

    warm = [f"{WARMUP_PREFIX}{text}" for text in stream.take(run.batch)]
    for _ in range(max(1, args.warmup)):
        await asyncio.gather(*(call(warm) for _ in range(run.concurrency)))
    errors.clear()
    deadline = time.perf_counter() + args.seconds
    budget = args.calls if run.sequential else MAX_CONCURRENT_CALLS
    issued = 0

    async def caller() -> None:
        nonlocal issued, rows_answered
        while issued < budget and time.perf_counter() < deadline:
            issued += 1
            outcome = await call(stream.take(run.batch))
            if outcome is not None:
                latencies.append(outcome[0])
                rows_answered += outcome[1]
                hits.append(outcome[2])

    cpu_before = cpu_seconds(pid) if pid is not None else None
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(run.concurrency)))
    wall_s = time.perf_counter() - started
    cpu_after = cpu_seconds(pid) if pid is not None else None
    cpu_us = None
    if cpu_before is not None and cpu_after is not None and latencies:
        cpu_us = (cpu_after - cpu_before) * 1e6 / len(latencies)
    measured: dict[str, Any] = {
        "target": target.name,
        "run": run.mode,
        "concurrency": run.concurrency,
        "batch": run.batch,
        "calls": len(latencies),
        "errors": dict(errors),
        "wall_s": wall_s,
        "cache_hits": sum(hits),
        # The server process's CPU time (all threads) per answered call, when its pid was given.
        "server_cpu_us_per_call": cpu_us,
        # Whether the timed calls ran past the end of the text file, so some texts came twice.
        "cycled": (len(latencies) + 1) * run.batch > len(stream),
        **summarise(latencies, rows_answered, wall_s),
    }
    if run.sequential:  # per call, for the cache's hit/miss split and the mean
        measured["latencies_ms"] = latencies
        measured["hits"] = hits
    return measured


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    import tritonclient.grpc.aio as grpcclient

    texts = [line for line in args.texts.read_text(encoding="utf-8").splitlines() if line]
    stream = TextStream(texts)
    clients = {target.name: grpcclient.InferenceServerClient(url=target.url) for target in args.targets}
    results: list[dict[str, Any]] = []
    try:
        for index, run in enumerate(args.runs):
            # Every target gets the same texts in the same order for a run; the first target rotates per run.
            start = stream.position
            for turn in range(len(args.targets)):
                target = args.targets[(index + turn) % len(args.targets)]
                stream.rewind(start)
                pid = dict(args.pids).get(target.name)
                results.append(await measure(clients[target.name], target, run, stream, args, pid))
            stream.rewind(max(r["calls"] for r in results[-len(args.targets) :]) * run.batch + start)
    finally:
        for client in clients.values():
            await client.close()
    return {
        "client": f"tritonclient.grpc.aio {version('tritonclient')}",
        "texts": len(texts),
        "runs": results,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(asyncio.run(drive(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
