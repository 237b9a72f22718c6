"""The performance section of `make bench`: the floor, the gateway's fast path, the peers, the cascade, the cache.

Everything is a server in a process of its own on 127.0.0.1, called by one measurement client, unmodified
tritonclient.grpc (app/bench_driver.py, a subprocess: its descriptors clash with the project's stubs), the same
way for every server, on fresh product names of the catalogue the models were built on. Counts and times are
bounded; results go to a table and to JSON. Targets are reported, never failed on.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.bench_driver import BATCH_CONCURRENCY
from app.bench_peers import PEERS, Peer, PeerServer, ensure_installed
from app.bench_relay import DelayRelay
from app.demo import ServerProcess, ensure_keys, hop_credentials, wait_serving
from training.measure import percentile

# The driver's runs for the side-by-side table (req/s at 1 concurrent comes from the sequential run).
SERVER_RUNS = ("sequential", "concurrent-16", "concurrent-64", "batch-32")
# One way of the modelled hop: a 20 ms round trip between gateway and cloud.
HOP_DELAY_S = 0.010
ZIPF_EXPONENT = 1.0
SEED = 11
# Tracing off in every server this section starts (whatever OTEL_* the bench itself runs under).
UNTRACED = {"OTEL_SDK_DISABLED": "true"}
BATCHING_ON = {"TIERGATE_GATEWAY__BATCHING__ENABLED": "true"}
CACHE_ON = {"TIERGATE_GATEWAY__CACHE__ENABLED": "true"}

# The targets: (key, what, limit).
P50_OVER_BARE_MAX = 1.25
BATCHING_GAIN_MIN = 2.5
CASCADE_OVER_CLOUD_MAX = 0.3
HIT_OVER_MISS_MAX = 0.5
RSS_MAX_MB = 300.0


@dataclass
class PerfOptions:
    """Bounds of the section: timed calls of a sequential run, seconds of each run, and what to include."""

    calls: int = 1000
    seconds: float = 3.0
    warmup: int = 30
    cascade_calls: int = 600
    cascade_seconds: float = 8.0
    cache_calls: int = 2000
    model_calls: int = 1000
    peers: bool = True
    build_dir: Path = Path("build")
    json_path: Path | None = Path("reports/bench.json")
    install_timeout_s: float = 600.0


@dataclass(frozen=True)
class Target:
    """One target of the issue: what was measured against what limit, and whether it holds."""

    name: str
    value: float | None
    limit: str
    met: bool | None  # None: not measured


@dataclass
class PerfResults:
    """Everything the section measured, as the table and the JSON show it."""

    setup: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw_edge: dict[str, dict[str, float]] = field(default_factory=dict)
    peers: dict[str, str] = field(default_factory=dict)  # peer name -> how it was installed, or why not
    cascade: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)


# Server names in the table; peers are named by their titles.
BARE = "bare grpc.aio (canned)"
# The gateway as it ships (dynamic batching off) is the one set against the peers; batching on beside it.
GATEWAY = "gateway edge (default)"
GATEWAY_BATCHED = "gateway edge, batching on"
CASCADE = "cascade (auto)"
CLOUD_ONLY = "cloud-only (tier cloud)"


def catalogue_texts(models_dir: Path, data_dir: Path | None) -> list[str]:
    """Every distinct product name of the catalogue the models were built on (all splits), in a seeded order."""
    from tiergate.manifest import load_manifest
    from training.data import load_split_for_manifest

    catalogue, _ = load_split_for_manifest(load_manifest(models_dir, verify=False), data_dir)
    names = sorted({text.strip() for text in catalogue.texts if text.strip() and "\n" not in text})
    random.Random(SEED).shuffle(names)
    return names


def zipf_replay(names: Sequence[str], requests: int, exponent: float = ZIPF_EXPONENT, seed: int = SEED) -> list[str]:
    """`requests` names drawn with Zipf weights (rank r weighs 1/r^exponent) over `names` in their order."""
    if not names:
        raise ValueError("a Zipf replay needs at least one name")
    weights = 1.0 / np.arange(1, len(names) + 1, dtype=np.float64) ** exponent
    drawn = np.random.default_rng(seed).choice(len(names), size=requests, p=weights / weights.sum())
    return [names[int(i)] for i in drawn]


def run_driver(
    texts: Sequence[str],
    targets: Mapping[str, str],
    runs: Sequence[str],
    options: PerfOptions,
    *,
    calls: int | None = None,
    seconds: float | None = None,
    env: Mapping[str, str] | None = None,
    pids: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Run app/bench_driver.py over `targets` (name -> HOST:PORT[?params]) and return what it printed; `pids`
    (name -> server process) get their CPU per call read."""
    seconds = options.seconds if seconds is None else seconds
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-") as work:
        path = Path(work) / "texts.txt"
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        command = [sys.executable, "-m", "app.bench_driver", "--texts", str(path)]
        command += [f"--target={name}={address}" for name, address in targets.items()]
        command += [f"--run={run}" for run in runs]
        command += [f"--pid={name}={pid}" for name, pid in (pids or {}).items()]
        command += ["--calls", str(calls or options.calls), "--seconds", str(seconds), "--warmup", str(options.warmup)]
        # Bounded: every run stops at its time, so the whole drive cannot take much longer than this.
        budget = len(targets) * len(runs) * (seconds + 30.0) + 60.0
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=budget, env={**os.environ, **(env or {})}, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"the driver failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def by_target(driven: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The driver's runs as target -> run mode -> figures."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run in driven["runs"]:
        table.setdefault(run["target"], {})[run["run"]] = run
    return table


def server_row(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One server's row of the table from its driver runs (missing figures are None)."""

    def figure(run: str, key: str) -> Any:
        return runs.get(run, {}).get(key)

    return {
        "p50_ms": figure("sequential", "p50_ms"),
        "p99_ms": figure("sequential", "p99_ms"),
        "req_per_s_1": figure("sequential", "req_per_s"),
        "req_per_s_16": figure("concurrent-16", "req_per_s"),
        "req_per_s_64": figure("concurrent-64", "req_per_s"),
        "rows_per_s_b32": figure("batch-32", "rows_per_s"),
        "p50_ms_16": figure("concurrent-16", "p50_ms"),
        "p50_ms_64": figure("concurrent-64", "p50_ms"),
        "cpu_us_1": figure("sequential", "server_cpu_us_per_call"),
        "cpu_us_64": figure("concurrent-64", "server_cpu_us_per_call"),
        "cache_hits": sum(int(run.get("cache_hits", 0)) for run in runs.values()),
        "cycled": any(run.get("cycled") for run in runs.values()),
        "errors": {code: n for run in runs.values() for code, n in run.get("errors", {}).items()},
    }


def peak_rss_mb(pid: int) -> float:
    """The peak resident set (VmHWM) of a live process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class BareServer:
    """app/bench_bare.py in a process of its own."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._work = tempfile.TemporaryDirectory(prefix="tiergate-bare-")
        port_file = Path(self._work.name) / "port"
        command = [sys.executable, "-m", "app.bench_bare", "--port-file", str(port_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the bare OIP server did not start")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{json.loads(port_file.read_text(encoding='utf-8'))['port']}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._work.cleanup()


def time_rows(run: Callable[[Any], object], inputs: Sequence[Any], rows: int) -> dict[str, float]:
    """p50/p99 (ms) and rows/s of calling `run` on each input in turn (the first tenth is warm-up, untimed)."""
    for warm in inputs[: max(1, len(inputs) // 10)]:
        run(warm)
    samples = []
    for item in inputs:
        started = time.perf_counter()
        run(item)
        samples.append((time.perf_counter() - started) * 1000.0)
    return {
        "p50_ms": percentile(samples, 0.5),
        "p99_ms": percentile(samples, 0.99),
        "rows_per_s": rows * 1000.0 / float(np.mean(samples)),
    }


def bench_raw_edge(models_dir: Path, texts: Sequence[str], calls: int) -> dict[str, dict[str, float]]:
    """The INT8 edge model in this process at batch 1 and 32: featurize + model + scoring, and the model alone
    on features computed beforehand."""
    from edge_runtime.model import EdgeModel

    edge = EdgeModel.load(models_dir)
    try:
        measured: dict[str, dict[str, float]] = {}
        for batch, count in ((1, calls), (32, max(20, calls // 10))):
            batches = [[texts[(i * batch + j) % len(texts)] for j in range(batch)] for i in range(count)]
            measured[f"featurize+model b{batch}"] = time_rows(edge.predict, batches, batch)
            features = [edge.features(rows) for rows in batches]
            measured[f"model only b{batch}"] = time_rows(edge.backend.run, features, batch)
        return measured
    finally:
        edge.close()


@contextmanager
def gateway_process(models_dir: Path, env: Mapping[str, str], args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """`tiergate serve gateway` (edge only unless `args` say otherwise), SERVING, stopped on exit."""
    command = ["gateway", "--models", str(models_dir), *(args or ["--edge-only"])]
    server = ServerProcess(command, env={**UNTRACED, **env})
    try:
        wait_serving(server.target)
        yield server
    finally:
        server.stop()


def start_peers(
    options: PerfOptions, results: PerfResults, stack: list[PeerServer], report: Callable[[str], None]
) -> None:
    """Install (or reuse) and start each peer onto `stack`; one that cannot is reported and left out."""
    for peer in PEERS:
        started = time.perf_counter()
        python, how = ensure_installed(options.build_dir, peer, timeout_s=options.install_timeout_s)
        results.peers[peer.name] = how
        if python is None:
            report(f"peer {peer.title} ({peer.requirement}): {how}; left out")
            continue
        server = PeerServer(peer, python)
        try:
            server.__enter__()
        except (RuntimeError, TimeoutError, OSError) as error:
            results.peers[peer.name] = f"{how}; did not start: {error}"
            report(f"peer {peer.title} ({peer.requirement}): did not start ({error}); left out\n{server.log_tail()}")
            continue
        stack.append(server)
        report(
            f"peer {peer.title} ({peer.requirement}, venv under {options.build_dir}/bench-peers/{peer.name}): {how}, "
            f"serving on {server.target} after {time.perf_counter() - started:.1f} s"
        )


def peer_label(peer: Peer) -> str:
    return f"{peer.title} {peer.requirement.split('==')[-1]}"


def bench_servers(
    models_dir: Path, texts: Sequence[str], options: PerfOptions, results: PerfResults, report: Callable[[str], None]
) -> None:
    """The floor, the gateway fast path (batching on and off) and the peers, side by side in one drive."""
    peers: list[PeerServer] = []
    bare = BareServer()
    try:
        with (
            gateway_process(models_dir, {}) as default,
            gateway_process(models_dir, BATCHING_ON) as batched,
        ):
            if options.peers:
                start_peers(options, results, peers, report)
            processes = {BARE: bare.process, GATEWAY: default.process, GATEWAY_BATCHED: batched.process}
            targets = {BARE: bare.target, GATEWAY: default.target, GATEWAY_BATCHED: batched.target}
            for peer in peers:
                assert peer.process is not None
                processes[peer_label(peer.peer)] = peer.process
                targets[peer_label(peer.peer)] = peer.target
            pids = {name: process.pid for name, process in processes.items()}
            driven = run_driver(texts, targets, SERVER_RUNS, options, pids=pids)
            results.rss_mb["gateway edge-only, default"] = peak_rss_mb(default.process.pid)
            results.rss_mb["gateway edge-only, batching on"] = peak_rss_mb(batched.process.pid)
        results.setup["client"] = driven["client"]
        for name, runs in by_target(driven).items():
            results.servers[name] = server_row(runs)
    finally:
        for peer in peers:
            peer.stop()
        bare.stop()


def bench_cascade(
    models_dir: Path, keys_dir: Path, texts: Sequence[str], options: PerfOptions, results: PerfResults
) -> None:
    """Cascade (auto) against cloud-only (tier=cloud), sequential, on held-out `texts` (so the edge escalates as
    it would on new names), through one secured stack whose hop crosses a relay adding HOP_DELAY_S each way."""
    token = ensure_keys(keys_dir)
    common = ["--models", str(models_dir), "--keys", str(keys_dir)]
    cloud = ServerProcess(["cloud", *common], env=UNTRACED)
    try:
        with DelayRelay(cloud.port, HOP_DELAY_S) as relay:
            wait_serving(cloud.target, credentials=hop_credentials(keys_dir))
            with gateway_process(models_dir, {}, [*common[2:], "--cloud", relay.target]) as gateway:
                targets = {CASCADE: gateway.target, CLOUD_ONLY: f"{gateway.target}?tier=cloud"}
                driven = run_driver(
                    texts,
                    targets,
                    ["sequential"],
                    options,
                    calls=options.cascade_calls,
                    seconds=options.cascade_seconds,
                    env={"TIERGATE_TOKEN": token},
                )
                results.rss_mb["gateway with cloud tier"] = peak_rss_mb(gateway.process.pid)
    finally:
        cloud.stop()
    for name, runs in by_target(driven).items():
        run = runs["sequential"]
        results.cascade[name] = {key: run[key] for key in ("calls", "mean_ms", "p50_ms", "p99_ms", "errors", "cycled")}


def bench_cache(models_dir: Path, names: Sequence[str], options: PerfOptions, results: PerfResults) -> None:
    """The gateway (edge only) with its response cache on, replaying a Zipf draw of the catalogue's names."""
    replay = zipf_replay(names, options.cache_calls)
    with gateway_process(models_dir, CACHE_ON) as gateway:
        driven = run_driver(
            replay, {"gateway, cache on": gateway.target}, ["sequential"], options, calls=len(replay), seconds=30.0
        )
        results.rss_mb["gateway edge-only, cache on"] = peak_rss_mb(gateway.process.pid)
    run = driven["runs"][0]
    latencies, hits = run["latencies_ms"], run["hits"]
    hit = [latency for latency, n in zip(latencies, hits, strict=True) if n > 0]
    miss = [latency for latency, n in zip(latencies, hits, strict=True) if n == 0]
    results.cache = {
        "requests": len(latencies),
        "distinct": len(set(replay)),
        "universe": len(names),
        "exponent": ZIPF_EXPONENT,
        "hit_rate": len(hit) / len(latencies) if latencies else None,
        "hit_p50_ms": percentile(hit, 0.5) if hit else None,
        "miss_p50_ms": percentile(miss, 0.5) if miss else None,
        "hit_p99_ms": percentile(hit, 0.99) if hit else None,
        "miss_p99_ms": percentile(miss, 0.99) if miss else None,
        # What a replay of this draw could hit at best: every repeat of a name seen before.
        "possible_hit_rate": 1.0 - len(set(replay)) / len(replay) if replay else None,
        "errors": run["errors"],
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _at_most(name: str, value: float | None, limit: float, unit: str = "") -> Target:
    return Target(name, value, f"<= {limit:g}{unit}", None if value is None else value <= limit)


def _at_least(name: str, value: float | None, limit: float) -> Target:
    return Target(name, value, f">= {limit:g}", None if value is None else value >= limit)


def performance_targets(results: PerfResults) -> list[Target]:
    """The issue's targets, each with its measured value (ratios from this one run)."""
    gateway = results.servers.get(GATEWAY, {})
    batched = results.servers.get(GATEWAY_BATCHED, {})
    bare = results.servers.get(BARE, {})
    targets: list[Target] = []
    for peer in PEERS:
        theirs = results.servers.get(peer_label(peer))
        if theirs is None:
            targets.append(
                Target(f"beats {peer.title}", None, "not measured: " + results.peers.get(peer.name, "off"), None)
            )
            continue
        for key, what, lower in (
            ("p50_ms", "p50", True),
            ("req_per_s_16", "req/s at 16", False),
            ("rows_per_s_b32", "rows/s at batch 32", False),
        ):
            ratio = _ratio(gateway.get(key), theirs.get(key))
            if lower:
                targets.append(_at_most(f"gateway/{peer.title} {what}", ratio, 1.0))
            else:
                targets.append(_at_least(f"gateway/{peer.title} {what}", ratio, 1.0))
    targets.append(
        _at_most(
            "gateway fast-path p50 / bare p50", _ratio(gateway.get("p50_ms"), bare.get("p50_ms")), P50_OVER_BARE_MAX
        )
    )
    targets.append(
        _at_least(
            "req/s at 64, batching on / off",
            _ratio(batched.get("req_per_s_64"), gateway.get("req_per_s_64")),
            BATCHING_GAIN_MIN,
        )
    )
    cascade = results.cascade.get(CASCADE, {})
    cloud = results.cascade.get(CLOUD_ONLY, {})
    targets.append(
        _at_most(
            f"cascade mean / cloud-only mean, {HOP_DELAY_S * 2000:.0f} ms hop",
            _ratio(cascade.get("mean_ms"), cloud.get("mean_ms")),
            CASCADE_OVER_CLOUD_MAX,
        )
    )
    cache = results.cache
    targets.append(
        _at_most(
            "cache hit p50 / miss p50", _ratio(cache.get("hit_p50_ms"), cache.get("miss_p50_ms")), HIT_OVER_MISS_MAX
        )
    )
    peak = max(results.rss_mb.values()) if results.rss_mb else None
    targets.append(_at_most("gateway peak RSS", peak, RSS_MAX_MB, " MB"))
    return targets


def _cell(value: float | None, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _times(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width - 1}.2f}x"


def performance_lines(results: PerfResults) -> list[str]:
    """The section's tables: servers side by side with ratios to the bare floor, the raw edge model, the cascade,
    the cache, RSS, then the targets and whether each is met."""
    lines = [
        f"{'server':<32}{'p50 ms':>8}{'p99 ms':>8}{'req/s@1':>9}{'req/s@16':>10}{'req/s@64':>10}{'rows/s b32':>12}"
        f"{'cpu us@1':>10}{'cpu us@64':>10}{'p50/bare':>10}{'@16/bare':>10}{'@64/bare':>10}{'b32/bare':>10}"
    ]
    bare = results.servers.get(BARE, {})
    for name, row in results.servers.items():
        lines.append(
            f"{name:<32}{_cell(row['p50_ms'], 8, 3)}{_cell(row['p99_ms'], 8, 3)}{_cell(row['req_per_s_1'], 9)}"
            f"{_cell(row['req_per_s_16'], 10)}{_cell(row['req_per_s_64'], 10)}{_cell(row['rows_per_s_b32'], 12)}"
            f"{_cell(row.get('cpu_us_1'), 10)}{_cell(row.get('cpu_us_64'), 10)}"
            f"{_times(_ratio(row['p50_ms'], bare.get('p50_ms')), 10)}"
            f"{_times(_ratio(row['req_per_s_16'], bare.get('req_per_s_16')), 10)}"
            f"{_times(_ratio(row['req_per_s_64'], bare.get('req_per_s_64')), 10)}"
            f"{_times(_ratio(row['rows_per_s_b32'], bare.get('rows_per_s_b32')), 10)}"
        )
    lines.append(
        "(p50/p99: sequential single-row calls; req/s@C: C concurrent callers; rows/s b32: batch-32 calls from "
        f"{BATCH_CONCURRENCY} callers; cpu us: the server process's CPU time, all threads, per call, sequential "
        "and at 64)"
    )
    noted = [
        f"{name}: {row['errors']}"
        for name, row in [*results.servers.items(), *results.cascade.items()]
        if row.get("errors")
    ]
    if noted:
        lines.append("errors: " + "; ".join(noted))
    if results.raw_edge:
        lines.append(f"{'raw edge model, in process':<32}{'p50 ms':>8}{'p99 ms':>8}{'rows/s':>12}")
        for name, timing in results.raw_edge.items():
            lines.append(
                f"{name:<32}{_cell(timing['p50_ms'], 8, 3)}{_cell(timing['p99_ms'], 8, 3)}"
                f"{_cell(timing['rows_per_s'], 12)}"
            )
    if results.cascade:
        lines.append(
            f"{f'hop +{HOP_DELAY_S * 2000:.0f} ms round trip':<32}{'calls':>8}{'mean ms':>9}{'p50 ms':>8}{'p99 ms':>8}"
        )
        for name, row in results.cascade.items():
            lines.append(
                f"{name:<32}{row['calls']:>8}{_cell(row['mean_ms'], 9, 2)}{_cell(row['p50_ms'], 8, 2)}"
                f"{_cell(row['p99_ms'], 8, 2)}"
            )
    cache = results.cache
    if cache:
        rate, possible = cache.get("hit_rate"), cache.get("possible_hit_rate")
        lines.append(
            f"cache, Zipf replay (s={cache['exponent']:g}) of {cache['requests']} requests over {cache['universe']} "
            f"names ({cache['distinct']} distinct drawn): hit rate "
            + ("-" if rate is None else f"{rate:.1%}")
            + ("" if possible is None else f" (at most {possible:.1%})")
            + f"; p50 hit {_cell(cache.get('hit_p50_ms'), 0, 3)} ms, miss {_cell(cache.get('miss_p50_ms'), 0, 3)} ms"
            + (f"; errors {cache['errors']}" if cache.get("errors") else "")
        )
    if results.rss_mb:
        lines.append("peak RSS (VmHWM): " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in results.rss_mb.items()))
    lines.append("targets (ratios from this run; a bench run does not fail on them):")
    for target in performance_targets(results):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target.met]
        value = "-" if target.value is None else f"{target.value:.3f}"
        lines.append(f"  {target.name:<44}{value:>10}  {target.limit:<28}{verdict}")
    return lines


def results_json(results: PerfResults) -> dict[str, Any]:
    """The section's results for `--json`: the measurements and the targets with their verdicts."""
    return {**asdict(results), "targets": [asdict(target) for target in performance_targets(results)]}


def bench_performance(models_dir: Path, data_dir: Path | None, keys_dir: Path, options: PerfOptions) -> bool:
    """The whole section: prints its setup, its tables and targets, and writes the JSON; False on request errors."""
    import grpc
    import onnxruntime

    from tiergate.manifest import load_manifest

    manifest = load_manifest(models_dir, verify=False)
    names = catalogue_texts(models_dir, data_dir)
    results = PerfResults()
    results.setup = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "models": f"{manifest.version} ({manifest.data.get('source')}, task {manifest.task})",
        "texts": len(names),
        "calls": options.calls,
        "seconds": options.seconds,
        "peers": options.peers,
    }
    print(
        f"performance: every server in a process of its own on 127.0.0.1, called by one unmodified "
        f"tritonclient.grpc (aio) driver in a process of its own, the same way for each: sequential "
        f"({options.calls} calls at most), then 16 and 64 concurrent callers and batch-32 calls from 16 callers "
        f"({options.seconds:g} s each), each after {options.warmup} warm-up rounds, servers interleaved run by run; "
        f"texts: {len(names)} distinct product names of {manifest.data.get('source')} in a seeded order, every "
        f"server the same ones, fresh on each call until they run out (then they cycle; the cache is off, and "
        f"responses' cache_hits are summed to show it); gateway: `serve gateway --edge-only` (models "
        f"{manifest.version}, no client auth, metrics on, tracing off), as shipped (dynamic batching "
        f"off) and with batching on (max_batch_rows 64, no added delay); the bare floor answers each row with "
        f"the same canned outputs, as do the peers' do-nothing models"
        + (
            "; peers: KServe ModelServer (1 worker, latency logging off; it binds all interfaces, called on "
            "127.0.0.1), MLServer (metrics, request logging and parallel workers off), each in its own venv "
            f"under {options.build_dir}/bench-peers (installed on the first run, then reused: the install's time "
            "counts only then)"
            if options.peers
            else "; peers left out (--no-peers)"
        ),
        flush=True,
    )
    started = time.perf_counter()
    results.raw_edge = bench_raw_edge(models_dir, names, options.model_calls)
    bench_servers(models_dir, names, options, results, lambda line: print(line, flush=True))
    from training.data import heldout_examples

    bench_cascade(models_dir, keys_dir, [text for text, _ in heldout_examples(models_dir, data_dir)], options, results)
    bench_cache(models_dir, names, options, results)
    results.setup["wall_s"] = time.perf_counter() - started
    for line in performance_lines(results):
        print(line)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(results_json(results), indent=2) + "\n", encoding="utf-8")
        print(f"performance: {results.setup['wall_s']:.0f} s; results written to {options.json_path}")
    failed = [row["errors"] for row in results.servers.values() if row["errors"]]
    failed += [row["errors"] for row in results.cascade.values() if row["errors"]]
    return not failed and not results.cache.get("errors")
