"""The bench's tracing-cost section: its setups configure tracing as named, its sink receives, its verdict reads."""

from __future__ import annotations

from app.bench import GATEWAY_INFER, OVERHEAD_TARGET, SETUP_ATTRIBUTE, Interleaved, tracing_cost_lines, tracing_setups
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
