"""Reliability under load, on servers in processes of their own: the cloud killed mid-run, a slow cloud, 4x
overload, SIGTERM under load, hot reload under load, and a three-tier chain whose middle tier dies. Each test
prints its figures (LOAD lines; also appended to $TIERGATE_LOAD_REPORT). `make test-load` runs them."""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.load import Outcome, ServerProcess, drive, p, report, running, text_request
from tests.tap import TapProxy

pytestmark = pytest.mark.load

# Every light row escalates (threshold 1.0): all of them need the cloud, so an outage touches every row.
ESCALATE_ALL = {"TIERGATE_GATEWAY__ROUTING__THRESHOLD": "1.0"}
QUIET = {
    "TIERGATE_GATEWAY__HOP_INSECURE": "true",
    "TIERGATE_CLOUD__INSECURE": "true",
    "TIERGATE_GATEWAY__DRIFT__SAMPLE_RATE": "0",
    "TIERGATE_GATEWAY__TRACING__ENABLED": "false",
    "TIERGATE_CLOUD__TRACING__ENABLED": "false",
    "TIERGATE_LOG_LEVEL": "WARNING",
}
QUICK_BREAKER = {
    "TIERGATE_GATEWAY__BREAKER__CONSECUTIVE_FAILURES": "3",
    "TIERGATE_GATEWAY__BREAKER__COOL_OFF_S": "2.0",
}


@pytest.fixture
def texts(tiny_rows: list[tuple[str, str]]) -> list[str]:
    return sorted({text for text, _ in tiny_rows if len(text.split()) <= 8})


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def cloud(models: Path, keyring: Path, work: Path, port: int = 0) -> ServerProcess:
    return ServerProcess("cloud", ["--models", str(models), "--keyring", str(keyring)], QUIET, work, port)


def gateway(models: Path, keyring: Path, work: Path, target: str, **env: str) -> ServerProcess:
    args = ["--models", str(models), "--keyring", str(keyring), "--cloud", target]
    return ServerProcess("gateway", args, {**QUIET, **env}, work)


def breaker_state(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith('tiergate_breaker_state{tier="cloud"}'):
                return float(line.split()[-1])
    return -1.0


def cloud_answered(outcome: Outcome) -> bool:
    return outcome.code == "OK" and "cloud" in outcome.tiers


async def test_cloud_killed_mid_run(tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]) -> None:
    """2,000 requests at 16 concurrent over 20 s; the cloud is killed at a quarter and comes back 5 s later."""
    up = cloud(tiny_models, keyring_path, work).start()
    gw = gateway(tiny_models, keyring_path, work, up.target, **ESCALATE_ALL, **QUICK_BREAKER).start()
    with running(up, gw):
        requests = [text_request([texts[i % len(texts)]]) for i in range(2000)]
        loop = asyncio.get_running_loop()
        killed_at = revived_at = reviving_at = 0.0
        open_spans: list[tuple[float, float]] = []
        opened = 0.0

        def at_request(index: int) -> None:
            nonlocal killed_at
            if index == 500 and not killed_at:
                up.kill()
                killed_at = loop.time()

        async def watch_breaker() -> None:
            """Record when the breaker is open (scraping metrics, for the baseline too); revive the cloud."""
            nonlocal opened, revived_at, reviving_at
            while True:
                state = await asyncio.to_thread(breaker_state, gw.metrics_port)
                now = loop.time()
                if state == 2.0 and not opened:
                    opened = now
                elif state != 2.0 and opened:
                    open_spans.append((opened, now))
                    opened = 0.0
                if killed_at and not revived_at and now - killed_at >= 5.0:
                    reviving_at = now
                    revived = cloud(tiny_models, keyring_path, work, port=up.port)
                    await asyncio.to_thread(revived.start)
                    up.process = revived.process
                    revived_at = loop.time()
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch_breaker())
        try:
            # The edge-only baseline: the same pacing and concurrency, every row kept at the edge.
            edge_only = [text_request([texts[i % len(texts)]], tier="edge") for i in range(600)]
            baseline = await drive(gw.target, edge_only, rate_per_s=99, concurrency=16)
            assert all(o.code == "OK" for o in baseline)
            outcomes = await drive(gw.target, requests, rate_per_s=99, concurrency=16, on_sent=at_request)
        finally:
            watcher.cancel()
        if opened:
            open_spans.append((opened, loop.time()))
    failed = [o for o in outcomes if o.code != "OK"]
    # Affected: requests with a row that needed the cloud (the edge was unsure) and got the edge's answer.
    needed = [(o, r) for o in outcomes if o.code == "OK" for t, r in zip(o.tiers, o.reasons, strict=True) if r]
    affected = [(o, r) for o, r in needed if "tier_unavailable" in r or "cloud" not in o.tiers]
    unflagged = [(o, r) for o, r in affected if not o.degraded or "tier_unavailable" not in r]
    back = [o.done for o in outcomes if cloud_answered(o) and o.sent >= revived_at]
    recovery_s = (min(back) - revived_at) if back else float("inf")
    # Requests the open breaker answered, before the revived cloud's start-up shared the machine's cores.
    during_open = [
        o for o in outcomes if o.done < reviving_at and any(a <= o.sent and o.done <= b for a, b in open_spans)
    ]
    edge_p99 = p(baseline, 0.99)
    open_p99 = p(during_open, 0.99) if during_open else float("nan")
    report(
        "cloud-killed",
        requests=len(outcomes),
        seconds=outcomes[-1].done - outcomes[0].sent,
        failed=len(failed),
        affected=len(affected),
        unflagged=len(unflagged),
        recovery_s=recovery_s,
        open_requests=len(during_open),
        open_p99_ms=open_p99,
        edge_only_p99_ms=edge_p99,
        ratio=open_p99 / edge_p99,
    )
    assert len(outcomes) == 2000 and outcomes[-1].done - outcomes[0].sent >= 20.0
    assert failed == [], f"{len(failed)} failed: {sorted({o.code for o in failed})}"
    assert affected and unflagged == []
    assert recovery_s <= 5.0
    assert during_open, "the breaker never opened"
    assert open_p99 <= 1.5 * edge_p99


async def test_slow_cloud_never_answers_late(
    tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]
) -> None:
    """2 s added on the hop; callers give 0.5 s: nothing comes back late, and the rows say `deadline`."""
    up = cloud(tiny_models, keyring_path, work).start()
    slow = TapProxy(up.port, delay_s=2.0)
    slow_port = await slow.start()
    gw = gateway(tiny_models, keyring_path, work, f"127.0.0.1:{slow_port}", **ESCALATE_ALL).start()
    with running(up, gw):
        requests = [text_request([texts[i % len(texts)], texts[(i + 1) % len(texts)]]) for i in range(200)]
        outcomes = await drive(gw.target, requests, rate_per_s=40, concurrency=8, timeout_s=0.5)
    await slow.close()
    late = [o for o in outcomes if o.code != "OK"]
    # The rows that needed the cloud (every row the edge was not sure of).
    rows = [reason for o in outcomes if o.code == "OK" for reason in o.reasons if reason]
    with_deadline = sum("deadline" in reason for reason in rows)
    report(
        "slow-cloud",
        requests=len(outcomes),
        deadline_s=0.5,
        late=len(late),
        max_ms=max(o.latency_ms for o in outcomes),
        p99_ms=p(outcomes, 0.99),
        rows=len(rows),
        rows_with_deadline=with_deadline,
    )
    assert late == [], f"{len(late)} requests got {sorted({o.code for o in late})}"
    assert max(o.latency_ms for o in outcomes) < 500.0
    assert rows and with_deadline == len(rows)


async def test_overload_at_four_times_capacity(
    tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]
) -> None:
    """Capacity measured first; then 4x that offered: the excess gets RESOURCE_EXHAUSTED at once, admitted
    requests keep their latency, memory stays bounded and the server stays up."""
    # Sized to the edge's one model thread: one 512-row request at a time, so none waits behind another.
    limits = {
        "TIERGATE_GATEWAY__LIMITS__MAX_INFLIGHT_REQUESTS": "1",
        "TIERGATE_GATEWAY__LIMITS__MAX_INFLIGHT_ROWS": "512",
    }
    gw = gateway(tiny_models, keyring_path, work, "127.0.0.1:1", **limits)
    gw.args.append("--edge-only")
    gw.start()
    with running(gw):
        # Requests of 512 rows: the server's work per request dwarfs the client's, so one client can offer 4x.
        batch = [texts[i % len(texts)] for i in range(512)]
        request = text_request(batch)
        unloaded = await drive(gw.target, [request] * 100, rate_per_s=10_000, concurrency=1, decode=False)
        # Capacity: what one request at a time gets through (the limit admits one).
        started = time.perf_counter()
        closed_loop = await drive(gw.target, [request] * 200, rate_per_s=10_000, concurrency=1, decode=False)
        capacity = sum(o.code == "OK" for o in closed_loop) / (time.perf_counter() - started)
        rss_before = gw.rss_mb()
        offered = 4 * capacity
        count = int(offered * 8)  # eight seconds of it
        outcomes = await drive(
            gw.target, [request] * count, rate_per_s=offered, concurrency=count, timeout_s=10.0, decode=False
        )
        rss_after = gw.rss_mb()
        live = await drive(gw.target, [request], rate_per_s=1, concurrency=1)
    admitted = [o for o in outcomes if o.code == "OK"]
    refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    other = [o for o in outcomes if o.code not in ("OK", "RESOURCE_EXHAUSTED")]
    report(
        "overload",
        capacity_rps=capacity,
        offered_rps=offered,
        requests=len(outcomes),
        admitted=len(admitted),
        refused=len(refused),
        other=len(other),
        refused_p50_ms=p(refused, 0.5) if refused else float("nan"),
        unloaded_p99_ms=p(unloaded, 0.99),
        admitted_p99_ms=p(admitted, 0.99),
        ratio=p(admitted, 0.99) / p(unloaded, 0.99),
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
    )
    assert other == [] and refused and admitted
    assert p(admitted, 0.99) <= 2.0 * p(unloaded, 0.99)
    assert rss_after - rss_before < 100.0
    assert live[0].code == "OK"


async def test_sigterm_under_load_completes_every_admitted_request(
    tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]
) -> None:
    up = cloud(tiny_models, keyring_path, work).start()
    gw = gateway(tiny_models, keyring_path, work, up.target, TIERGATE_GATEWAY__GRACE_S="10").start()
    exit_code: int | None = None
    with running(up, gw):
        loop = asyncio.get_running_loop()
        terminated_at = 0.0

        def at_request(index: int) -> None:
            nonlocal terminated_at
            if index == 300:
                terminated_at = loop.time()
                assert gw.process is not None
                gw.process.send_signal(15)

        requests = [text_request([texts[i % len(texts)], texts[(i + 3) % len(texts)]]) for i in range(600)]
        outcomes = await drive(gw.target, requests, rate_per_s=100, concurrency=16, on_sent=at_request)
        assert gw.process is not None
        exit_code = await asyncio.to_thread(gw.process.wait, 30)
    answered = [o for o in outcomes if o.code == "OK"]
    # After the signal: refused while draining (UNAVAILABLE), or cut off as the port closes (CANCELLED).
    refused = [o for o in outcomes if o.sent >= terminated_at and o.code in ("UNAVAILABLE", "CANCELLED")]
    broken = [o for o in outcomes if o.code != "OK" and o not in refused]
    # Admitted: sent before the signal. Each of those got its answer.
    admitted = [o for o in outcomes if o.sent < terminated_at]
    lost = [o for o in admitted if o.code != "OK"]
    report(
        "sigterm",
        requests=len(outcomes),
        admitted_before_signal=len(admitted),
        answered=len(answered),
        refused_after=len(refused),
        broken=len(broken),
        lost=len(lost),
        exit_code=exit_code,
    )
    assert exit_code == 0
    assert lost == [] and broken == [], [(o.code, o.details) for o in broken]
    assert refused, "requests after the signal should be refused (UNAVAILABLE), not hang"


async def test_hot_reload_under_load(tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]) -> None:
    from tests.test_hot_reload import add_version, corrupt_edge_file, versions_with_one

    root = versions_with_one(work, tiny_models)
    up = cloud(tiny_models, keyring_path, work).start()
    gw = gateway(root, keyring_path, work, up.target, TIERGATE_GATEWAY__RELOAD_POLL_S="0.2").start()
    with running(up, gw):
        loop = asyncio.get_running_loop()
        swapped_at = broken_at = 0.0

        def at_request(index: int) -> None:
            nonlocal swapped_at, broken_at
            if index == 300:
                add_version(root, 2, tiny_models)
                swapped_at = loop.time()
            if index == 900:
                corrupt_edge_file(add_version(root, 3, tiny_models))
                broken_at = loop.time()

        requests = [text_request([texts[i % len(texts)]]) for i in range(1500)]
        outcomes = await drive(gw.target, requests, rate_per_s=150, concurrency=16, on_sent=at_request)
    failed = [o for o in outcomes if o.code != "OK"]
    versions = [o.version for o in outcomes if o.code == "OK"]
    switched = next((o.done - swapped_at for o in outcomes if o.version == "2"), float("inf"))
    after_broken = [o.version for o in outcomes if o.sent > broken_at + 1.0]
    report(
        "hot-reload",
        requests=len(outcomes),
        failed=len(failed),
        served_v1=versions.count("1"),
        served_v2=versions.count("2"),
        served_v3=versions.count("3"),
        switch_s=switched,
    )
    assert failed == []
    assert versions[0] == "1" and versions[-1] == "2" and "3" not in versions
    assert after_broken and set(after_broken) == {"2"}


async def test_three_tier_chain_middle_tier_dies_under_load(
    tiny_models: Path, keyring_path: Path, work: Path, texts: list[str]
) -> None:
    mid = cloud(tiny_models, keyring_path, work).start()
    top = cloud(tiny_models, keyring_path, work).start()
    chain = {
        "TIERGATE_GATEWAY__CHAIN": "edge,mid,cloud",
        "TIERGATE_GATEWAY__TIERS__MID__TARGET": mid.target,
        "TIERGATE_GATEWAY__TIERS__MID__THRESHOLD": "1.0",
    }
    gw = gateway(tiny_models, keyring_path, work, top.target, **ESCALATE_ALL, **QUICK_BREAKER, **chain).start()
    heavy = " ".join(["word"] * 40)
    with running(mid, top, gw):

        def at_request(index: int) -> None:
            if index == 200:
                mid.kill()

        requests = [text_request([texts[i % len(texts)], heavy, texts[(i + 5) % len(texts)]]) for i in range(800)]
        outcomes = await drive(gw.target, requests, rate_per_s=100, concurrency=16, on_sent=at_request)
    failed = [o for o in outcomes if o.code != "OK"]
    rows = sum(len(o.tiers) for o in outcomes if o.code == "OK")
    after = [o for o in outcomes[300:] if o.code == "OK"]
    # Light rows the edge was unsure of passed the dead middle tier: answered by the cloud, flagged.
    light = [(o.tiers[i], o.reasons[i]) for o in after for i in (0, 2) if o.reasons[i]]
    light_flagged = bool(light) and all(t == "cloud" and "tier_unavailable" in r for t, r in light)
    heavy_at_cloud = all(o.tiers[1] == "cloud" and o.reasons[1] == "long_input" for o in after)
    report(
        "three-tier",
        requests=len(outcomes),
        failed=len(failed),
        rows_answered=rows,
        rows_sent=3 * len(outcomes),
        unsure_light_rows_after_kill=len(light),
        light_rows_flagged_after_kill=light_flagged,
        heavy_rows_at_cloud=heavy_at_cloud,
    )
    assert failed == [] and rows == 3 * len(outcomes)
    assert light_flagged and heavy_at_cloud


def test_harness_cleans_up(tmp_path: Path) -> None:
    """The harness leaves no server behind even when a test fails inside `running`."""
    server = ServerProcess("cloud", ["--models", str(tmp_path / "none")], QUIET, tmp_path)
    with pytest.raises(RuntimeError, match="did not start"):
        server.start(timeout_s=30)
    assert server.process is not None and server.process.poll() is not None
    shutil.rmtree(tmp_path, ignore_errors=True)
