"""The real OTLP/gRPC receiver the tracing tests export to; it lives in `app.otlp_sink`, which `make bench` uses too."""

from __future__ import annotations

from app.otlp_sink import OtlpReceiver, ReceivedSpan

__all__ = ["OtlpReceiver", "ReceivedSpan"]
