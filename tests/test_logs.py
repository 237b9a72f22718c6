"""Logging configured once at the entry point: JSON and plain lines, the request id on records, warnings captured."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import build_parser, main, resolve_log_level
from tiergate.logs import REQUEST_ID, RequestIdFilter, configure_logging, show_progress


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A stream to configure logging onto; the process's logging set-up is put back afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        # Remove only the handlers configure_logging installed: pytest adds and removes its own per phase.
        for handler in root.handlers[:]:
            if any(isinstance(f, RequestIdFilter) for f in handler.filters):
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        logging.getLogger("tests.quiet").setLevel(logging.NOTSET)


def _json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_message_and_request_id(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    logger = logging.getLogger("tests.logs")
    logger.info("routed %d rows to %s", 3, "edge")
    logger.debug("below the level: not written")
    token = REQUEST_ID.set("req-42")
    try:
        logger.warning("escalated")
    finally:
        REQUEST_ID.reset(token)

    first, second = _json_lines(log_stream)
    assert {"time", "level", "logger", "message", "request_id"} <= first.keys()
    assert first["level"] == "INFO" and first["logger"] == "tests.logs"
    assert first["message"] == "routed 3 rows to edge"
    assert first["request_id"] == "-"
    assert second["level"] == "WARNING" and second["request_id"] == "req-42"
    assert str(first["time"]).endswith("+00:00")
    assert "exception" not in first


def test_json_line_holds_the_exception_text(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    try:
        raise RuntimeError("the cloud tier fell over")
    except RuntimeError:
        logging.getLogger("tests.logs").exception("unexpected error in %s", "ModelInfer")

    (entry,) = _json_lines(log_stream)  # one line, however long the traceback
    assert entry["level"] == "ERROR" and entry["message"] == "unexpected error in ModelInfer"
    assert "Traceback" in str(entry["exception"]) and "RuntimeError: the cloud tier fell over" in str(
        entry["exception"]
    )


async def test_each_task_logs_its_own_request_id(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    logger = logging.getLogger("tests.logs")

    async def handle(request_id: str) -> None:
        REQUEST_ID.set(request_id)
        await asyncio.sleep(0)  # let the other request run in between
        logger.info("answered %s", request_id)

    await asyncio.gather(handle("a-1"), handle("b-2"))
    logger.info("after the requests")

    by_message = {entry["message"]: entry["request_id"] for entry in _json_lines(log_stream)}
    assert by_message == {"answered a-1": "a-1", "answered b-2": "b-2", "after the requests": "-"}


def test_plain_lines_show_the_request_id_only_inside_a_request(log_stream: io.StringIO) -> None:
    configure_logging("debug", "plain", stream=log_stream)
    logger = logging.getLogger("tests.logs")
    logger.info("serving on port %d", 8001)
    token = REQUEST_ID.set("req-7")
    try:
        logger.debug("edge answered")
    finally:
        REQUEST_ID.reset(token)

    outside, inside = log_stream.getvalue().splitlines()
    assert outside.endswith(" INFO tests.logs: serving on port 8001")
    assert inside.endswith(" DEBUG tests.logs [req-7]: edge answered")
    assert "{" not in outside


def test_named_loggers_can_be_quieter_than_the_root(log_stream: io.StringIO) -> None:
    configure_logging("info", "plain", stream=log_stream, levels={"tests.quiet": "warning"})
    logging.getLogger("tests.quiet").info("hidden")
    logging.getLogger("tests.quiet").warning("shown")
    logging.getLogger("tests.loud").info("also shown")

    assert "hidden" not in log_stream.getvalue()
    assert "shown" in log_stream.getvalue() and "also shown" in log_stream.getvalue()


def test_warnings_are_captured_through_logging(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("the threshold file is old", UserWarning, stacklevel=1)

    (entry,) = _json_lines(log_stream)
    assert entry["logger"] == "py.warnings" and entry["level"] == "WARNING"
    assert "UserWarning: the threshold file is old" in str(entry["message"])


@pytest.mark.parametrize(
    ("level", "log_format", "message"),
    [("info", "xml", "unknown log format 'xml'"), ("chatty", "plain", "unknown log level 'chatty'")],
)
def test_an_unknown_level_or_format_is_refused_with_the_choices(
    log_stream: io.StringIO, level: str, log_format: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as error:
        configure_logging(level, log_format, stream=log_stream)
    assert "expected one of" in str(error.value)


def test_progress_bars_show_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert show_progress(stream=Terminal())
    assert not show_progress(False, stream=Terminal())
    assert not show_progress(stream=io.StringIO())


@pytest.mark.parametrize("source", ["flag", "environment"])
def test_the_cli_configures_json_logging_by_flag_or_environment(
    log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    monkeypatch.setenv("TIERGATE_LOG_FORMAT", "json" if source == "environment" else "plain")
    flags = ["--log-format", "json"] if source == "flag" else []
    # `calibrate` without a target refuses before it loads anything: main() runs, cheaply.
    assert main([*flags, "calibrate"]) == 2
    logging.getLogger("tests.cli").warning("configured by %s", source)

    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "give exactly one of --target-escalation or --target-quality"
    entry = json.loads(lines[-1])
    assert entry["message"] == f"configured by {source}" and entry["logger"] == "tests.cli"


def test_the_cli_refuses_an_unknown_log_format_from_the_environment(
    log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERGATE_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate"])
    assert exit_.value.code == 2
    assert "unknown log format 'xml'; expected one of plain, json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["demo"], None, "warning"),
        (["bench"], None, "warning"),
        (["models", "build"], None, "info"),
        (["demo"], "debug", "debug"),
        (["--log-level", "error", "models", "build"], "debug", "error"),
    ],
)
def test_the_demo_and_bench_log_only_warnings_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("TIERGATE_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TIERGATE_LOG_LEVEL", env)
    assert resolve_log_level(build_parser().parse_args(argv)) == expected


def test_the_quantizer_notices_are_logged_at_debug_not_on_the_console(log_stream: io.StringIO, tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from training.quantize import quantize_dynamic_int8

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight],
    )
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)

    configure_logging("debug", "json", stream=log_stream)
    quantize_dynamic_int8(fp32, tmp_path / "int8.onnx")
    entries = _json_lines(log_stream)

    assert (tmp_path / "int8.onnx").is_file()
    assert [e for e in entries if e["logger"] == "root"] == []  # where onnxruntime logs them
    notices = [e for e in entries if e["logger"] == "training.quantize"]
    assert notices and all(e["level"] == "DEBUG" for e in notices)
    assert any("pre-process" in str(e["message"]) for e in notices)
