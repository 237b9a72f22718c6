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
