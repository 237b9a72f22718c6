"""The bench's tracing-cost section (its setups configure tracing as named, its sink receives, its verdict reads) and
its sealing-cost section (real hops, real envelopes, a table whose shares are shares)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bench import (
    GATEWAY_INFER,
    OVERHEAD_TARGET,
    SEAL_HOPS,
    SEAL_TARGET,
    SERVED_HOPS,
    SETUP_ATTRIBUTE,
    Interleaved,
    SealedCall,
    bench_sealing_cost,
    seal_payload,
    sealing_cost_lines,
    tracing_cost_lines,
    tracing_setups,
)
from app.otlp_sink import OtlpSink, ReceivedSpan
from tiergate.settings import TracingSettings
from tiergate.telemetry import Tracing, resolve


def test_each_setup_configures_tracing_as_named_and_the_sink_tells_them_apart() -> None:
    with OtlpSink() as sink:
        off, always, ratio = tracing_setups(sink.endpoint)
        # A stray endpoint in the bench's own environment must not switch the baseline on.
        stray = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://elsewhere:4317"}
        assert not resolve(TracingSettings(), "tiergate-gateway", env={**stray, **off.env}).exporting
        sampled = resolve(TracingSettings(), "tiergate-gateway", env={**stray, **ratio.env})
        assert (sampled.endpoint, sampled.sampler, sampled.sampler_arg) == (
            sink.endpoint,
            "parentbased_traceidratio",
            0.1,
        )
        tracing = Tracing(resolve(TracingSettings(), "tiergate-gateway", env={**stray, **always.env}))
        assert tracing.config.sampler == "always_on"
        for _ in range(3):
            with tracing.tracer.start_as_current_span("request"):
                pass
        tracing.shutdown()  # flushes to the sink, which runs on its own loop in the background
    spans = sink.spans  # still readable once the sink has stopped
    assert [s.name for s in spans] == ["request"] * 3
    assert {s.resource[SETUP_ATTRIBUTE] for s in spans} == {always.name}
    assert {s.service for s in spans} == {"tiergate-gateway"}


def test_the_section_reports_medians_ratios_and_the_target_without_failing_on_it() -> None:
    setups = tracing_setups("http://127.0.0.1:1")
    measured = Interleaved(rounds=[[1.0, 1.5, 1.05], [1.0, 1.5, 1.05], [2.0, 3.0, None]])
    spans = [
        ReceivedSpan("tiergate-gateway", f"{i:032x}", f"{i:016x}", "", span, 2, 0, resource={SETUP_ATTRIBUTE: name})
        for i, (name, span) in enumerate(
            [
                ("on 1.0", GATEWAY_INFER),
                ("on 1.0", GATEWAY_INFER),
                ("on 1.0", "tiergate.seal"),
                ("on 0.1", GATEWAY_INFER),
            ]
        )
    ]
    lines = tracing_cost_lines(setups, measured, spans, sent=4)
    off, always, ratio = (line.split() for line in lines[1:4])
    assert off == ["off", "3", "1.000", "2.000", "1.000x", "1.000x", "0", "0", "0.0%"]
    assert always == ["on", "1.0", "3", "1.500", "3.000", "1.500x", "1.500x", "3", "2", "50.0%"]
    assert ratio == ["on", "0.1", "2", "1.050", "1.050", "1.050x", "1.050x", "1", "1", "25.0%"]
    assert lines[-1].endswith(f"<= {OVERHEAD_TARGET:.0%} vs off: +5.0% (+50 us), met")
    measured.rounds[0][2] = measured.rounds[1][2] = 1.2
    assert "+20.0% (+200 us), NOT met" in tracing_cost_lines(setups, measured, spans, sent=4)[-1]


def test_the_sealing_section_times_both_hops_at_both_sizes_and_reports_shares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["a held-out sentence about the weather", "ünïcode text, two bytes a letter", "short"]
    assert bench_sealing_cost(tmp_path / "keys", texts, {1024: 5, 64 * 1024: 3}, warmup=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sealing cost: ")
    # The TLS port really is mutual TLS: the server saw the gateway's client certificate.
    assert "insecure/-, ssl/tiergate-gateway" in lines[0]
    assert lines[1].split()[:3] == ["hop", "payload", "calls"]
    rows = [line.split() for line in lines[2:6]]
    hops = [" ".join(row[: len(hop.split())]) for row, hop in zip(rows, SEAL_HOPS * 2, strict=True)]
    assert hops == [*SEAL_HOPS, *SEAL_HOPS]
    for row, (size, calls) in zip(rows, [("1", "5")] * 2 + [("64", "3")] * 2, strict=True):
        rest = row[-10:]  # payload number, unit, calls, rt, crypto, share, four steps
        assert rest[:3] == [size, "KiB", calls]
        round_trip, crypto, share = float(rest[3]), float(rest[4]), float(rest[5].rstrip("%")) / 100
        steps = [float(step) for step in rest[6:]]
        assert 0 < crypto < round_trip and all(step > 0 for step in steps)
        assert 0 < share < 1
    assert lines[6].startswith("(rt: ")
    assert lines[7].startswith("ratios: mutual TLS/plaintext rt p50 1 KiB ") and ", 64 KiB " in lines[7]
    assert lines[8].startswith("bare hop (echo, no model; the transport floor): 1 KiB share plaintext ")
    assert len(lines) == 9  # no error line, and no served hop without a model


def test_the_sealing_section_measures_the_hop_as_served_with_the_cloud_model(
    tmp_path: Path, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = ["organic whole milk", "sea salt crackers", "free range eggs"]
    assert bench_sealing_cost(tmp_path / "keys", texts, {1024: 4, 2048: 2}, warmup=1, models_dir=tiny_models)
    lines = capsys.readouterr().out.splitlines()
    served = [line for line in lines if line.startswith(SERVED_HOPS)]
    assert [line.split()[3:6] for line in served] == [["1", "KiB", "4"]] * 2
    assert lines[-1].startswith(f"target: 1 KiB share <= {SEAL_TARGET:.0%} of the hop as served: plain + model ")


def test_payloads_add_up_to_the_size_and_the_verdict_reads_without_failing_on_it() -> None:
    for texts in (["ab", "ü" * 5], ["x" * 3000]):  # texts taken in turn, the last one cut (never inside a letter)
        payload = seal_payload(texts, 1024)
        assert sum(len(text.encode("utf-8")) for text in payload.texts) == 1024
    calls = {
        ("plaintext", 1024): [SealedCall(100e-6, (1e-6, 1e-6, 0.5e-6, 0.5e-6))] * 3,
        ("mutual TLS", 1024): [SealedCall(120e-6, (1e-6, 1e-6, 0.5e-6, 0.5e-6))] * 3,
        ("plaintext", 65536): [SealedCall(400e-6, (10e-6, 10e-6, 10e-6, 10e-6))],
        ("mutual TLS", 65536): [SealedCall(600e-6, (10e-6, 10e-6, 10e-6, 10e-6))],
    }
    lines = sealing_cost_lines(calls)
    assert lines[1].split() == ["plaintext", "1", "KiB", "3", "100.0", "3.0", "3.00%", "1.0", "1.0", "0.5", "0.5"]
    assert lines[4].split()[-6:-4] == ["40.0", "6.67%"]
    assert lines[-2] == "ratios: mutual TLS/plaintext rt p50 1 KiB 1.20x, 64 KiB 1.50x"
    assert lines[-1].endswith("plaintext 3.00%, mutual TLS 2.50%: <= 3%")
    calls[("mutual TLS", 1024)] = [SealedCall(50e-6, (1e-6, 1e-6, 0.5e-6, 0.5e-6))]
    assert sealing_cost_lines(calls)[-1].endswith("mutual TLS 6.00%: over 3%")
    calls[(SERVED_HOPS[0], 1024)] = [SealedCall(4000e-6, (10e-6, 10e-6, 10e-6, 10e-6))]
    calls[(SERVED_HOPS[1], 1024)] = [SealedCall(2000e-6, (10e-6, 10e-6, 10e-6, 10e-6))]
    assert sealing_cost_lines(calls)[-1].endswith("plain + model 1.00%, mTLS + model 2.00%; met")
    calls[(SERVED_HOPS[1], 1024)] = [SealedCall(1000e-6, (10e-6, 10e-6, 10e-6, 10e-6))]
    assert sealing_cost_lines(calls)[-1].endswith("4.00%; NOT met (reported; a bench run does not fail on it)")


# The performance section: its driver (unmodified tritonclient in a process of its own), the bare floor, the
# relay that models a distant cloud, the Zipf replay, and the table, targets and JSON it reports.


def test_the_zipf_replay_is_seeded_and_favours_the_first_names() -> None:
    from collections import Counter

    from app.bench_perf import zipf_replay

    names = [f"name {i}" for i in range(500)]
    replay = zipf_replay(names, 4000, exponent=1.0, seed=3)
    assert replay == zipf_replay(names, 4000, exponent=1.0, seed=3)
    assert len(replay) == 4000 and set(replay) <= set(names)
    counts = Counter(replay)
    # Rank 1 weighs twice rank 2 and ten times rank 10 under s = 1 (within sampling noise).
    assert counts["name 0"] > counts["name 1"] > counts["name 9"]
    assert 1.5 < counts["name 0"] / counts["name 1"] < 2.7
    with pytest.raises(ValueError, match="at least one name"):
        zipf_replay([], 10)


def test_the_driver_reads_targets_runs_and_pids_and_refuses_malformed_ones() -> None:
    import argparse

    from app.bench_driver import BATCH_CONCURRENCY, Run, Target, parse_pid, parse_run, parse_target

    assert parse_target("gw=127.0.0.1:8001") == Target("gw", "127.0.0.1:8001")
    assert parse_target("cloud-only (tier cloud)=127.0.0.1:9?tier=cloud&x=1") == Target(
        "cloud-only (tier cloud)", "127.0.0.1:9", {"tier": "cloud", "x": "1"}
    )
    assert parse_run("sequential") == Run("sequential", 1, 1)
    assert parse_run("concurrent-64") == Run("concurrent-64", 64, 1)
    assert parse_run("batch-32") == Run("batch-32", BATCH_CONCURRENCY, 32)
    assert parse_pid("gw=123") == ("gw", 123)
    for bad, parse in (
        ("127.0.0.1:8001", parse_target),
        ("gw=nowhere", parse_target),
        ("gw=127.0.0.1:1?tier", parse_target),
        ("concurrent-0", parse_run),
        ("burst-3", parse_run),
        ("gw=x", parse_pid),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_the_canned_answer_has_the_gateways_outputs_one_row_each_raw_or_typed() -> None:
    import struct

    from app.bench_bare import CANNED_LABEL, canned_response

    raw = canned_response(3, raw=True)
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [
        ("label", "BYTES", [3]),
        ("confidence", "FP32", [3]),
        ("tier", "BYTES", [3]),
        ("routing_signal", "FP32", [3]),
    ]
    assert raw.raw_output_contents[0] == (struct.pack("<I", len(CANNED_LABEL)) + CANNED_LABEL) * 3
    assert len(raw.raw_output_contents[1]) == 3 * 4
    typed = canned_response(2, raw=False)
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.bytes_contents) == [CANNED_LABEL] * 2


def test_the_driver_measures_the_bare_floor_with_unmodified_tritonclient(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    from app.bench_perf import BareServer, PerfOptions, by_target, run_driver, server_row

    bare = BareServer()
    try:
        options = PerfOptions(calls=40, seconds=0.3, warmup=2)
        texts = [f"organic whole milk {i}" for i in range(100)]
        driven = run_driver(
            texts,
            {"a": bare.target, "b": f"{bare.target}?tier=edge"},
            ["sequential", "concurrent-4", "batch-8"],
            options,
            pids={"a": bare.process.pid},
        )
    finally:
        bare.stop()
    assert driven["client"] == "tritonclient.grpc.aio 2.73.0" and driven["texts"] == 100
    runs = by_target(driven)
    assert set(runs) == {"a", "b"} and set(runs["a"]) == {"sequential", "concurrent-4", "batch-8"}
    sequential = runs["a"]["sequential"]
    assert sequential["calls"] == 40 and not sequential["errors"] and not sequential["cycled"]
    assert len(sequential["latencies_ms"]) == len(sequential["hits"]) == 40 and sequential["cache_hits"] == 0
    assert 0 < sequential["p50_ms"] <= sequential["p99_ms"]
    assert (
        sequential["server_cpu_us_per_call"] is not None and runs["b"]["sequential"]["server_cpu_us_per_call"] is None
    )
    batch = runs["b"]["batch-8"]
    assert batch["batch"] == 8 and batch["rows_per_s"] == pytest.approx(8 * batch["req_per_s"])
    assert "latencies_ms" not in batch  # per-call lists only for sequential runs
    row = server_row(runs["a"])
    assert row["p50_ms"] == sequential["p50_ms"] and row["req_per_s_16"] is None and row["errors"] == {}


def test_the_relay_adds_its_delay_each_way_to_a_round_trip() -> None:
    import asyncio
    import time

    from app.bench_relay import DelayRelay

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def round_trips(port: int) -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            times.append(time.perf_counter() - started)
        writer.close()
        return times

    async def main() -> tuple[list[float], list[float]]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        direct = await round_trips(port)
        with DelayRelay(port, 0.015) as relay:
            relayed = await round_trips(relay.port)
        server.close()
        return direct, relayed

    direct, relayed = asyncio.run(main())
    assert min(relayed) >= 0.030 > max(direct)


def _perf_results() -> object:
    from app.bench_perf import BARE, CASCADE, CLOUD_ONLY, GATEWAY, GATEWAY_BATCHED, PerfResults

    def row(p50: float, r16: float, r64: float, b32: float) -> dict[str, object]:
        return {
            "p50_ms": p50,
            "p99_ms": p50 * 2,
            "req_per_s_1": 1000 / p50,
            "req_per_s_16": r16,
            "req_per_s_64": r64,
            "rows_per_s_b32": b32,
            "cpu_us_1": 300.0,
            "cpu_us_64": 250.0,
            "errors": {},
        }

    results = PerfResults()
    results.servers = {
        BARE: row(0.5, 4000, 3800, 100_000),
        GATEWAY: row(0.6, 2000, 3000, 40_000),
        GATEWAY_BATCHED: row(0.6, 1500, 9000, 30_000),
        "KServe ModelServer 0.21.0": row(0.7, 1000, 1000, 50_000),
    }
    results.peers = {"kserve": "cached", "mlserver": "install failed, exit 1 (log: x)"}
    results.cascade = {
        CASCADE: {"calls": 100, "mean_ms": 5.0, "p50_ms": 1.0, "p99_ms": 30.0, "errors": {}},
        CLOUD_ONLY: {"calls": 50, "mean_ms": 25.0, "p50_ms": 25.0, "p99_ms": 30.0, "errors": {}},
    }
    results.cache = {
        "requests": 100,
        "distinct": 40,
        "universe": 500,
        "exponent": 1.0,
        "hit_rate": 0.6,
        "possible_hit_rate": 0.6,
        "hit_p50_ms": 0.4,
        "miss_p50_ms": 1.0,
    }
    results.rss_mb = {"gateway edge-only": 120.0, "gateway with cloud tier": 130.0}
    return results


def test_the_targets_take_their_ratios_from_the_run_and_say_what_was_not_measured() -> None:
    from app.bench_perf import PerfResults, performance_targets

    results = _perf_results()
    assert isinstance(results, PerfResults)
    verdicts = {t.name: (None if t.value is None else round(t.value, 3), t.met) for t in performance_targets(results)}
    assert verdicts["gateway/KServe ModelServer p50"] == (0.857, True)
    assert verdicts["gateway/KServe ModelServer req/s at 16"] == (2.0, True)
    assert verdicts["gateway/KServe ModelServer rows/s at batch 32"] == (0.8, False)
    assert verdicts["beats Seldon MLServer"] == (None, None)
    assert verdicts["gateway fast-path p50 / bare p50"] == (1.2, True)
    assert verdicts["req/s at 64, batching on / off"] == (3.0, True)
    assert verdicts["cascade mean / cloud-only mean, 20 ms hop"] == (0.2, True)
    assert verdicts["cache hit p50 / miss p50"] == (0.4, True)
    assert verdicts["gateway peak RSS"] == (130.0, True)
    results.servers.clear()  # nothing measured: the ratios are missing, not zero, and nothing fails
    missing = [t for t in performance_targets(results) if t.name.startswith(("beats", "gateway fast-path", "req/s"))]
    assert [(t.value, t.met) for t in missing] == [(None, None)] * 4


def test_the_table_shows_ratios_to_the_bare_floor_and_the_json_is_strict() -> None:
    import json

    from app.bench_perf import PerfResults, performance_lines, results_json

    results = _perf_results()
    assert isinstance(results, PerfResults)
    lines = performance_lines(results)
    assert lines[0].split()[:3] == ["server", "p50", "ms"]
    gateway = next(line for line in lines if line.startswith("gateway edge (default)"))
    assert gateway.split()[-4:] == ["1.20x", "0.50x", "0.79x", "0.40x"]
    assert gateway.split()[-6:-4] == ["300", "250"]
    assert any(line.startswith("cache, Zipf replay (s=1) of 100 requests over 500 names") for line in lines)
    assert any("hit rate 60.0% (at most 60.0%); p50 hit 0.400 ms, miss 1.000 ms" in line for line in lines)
    targets = lines[lines.index("targets (ratios from this run; a bench run does not fail on them):") + 1 :]
    assert any(line.split()[-2:] == ["NOT", "met"] and "rows/s at batch 32" in line for line in targets)
    assert any(line.endswith("not measured") and "MLServer" in line for line in targets)
    written = json.loads(json.dumps(results_json(results), allow_nan=False))
    assert written["peers"]["mlserver"].startswith("install failed")
    assert {t["name"] for t in written["targets"]} >= {"gateway peak RSS", "cache hit p50 / miss p50"}
