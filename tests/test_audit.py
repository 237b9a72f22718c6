"""The audit log on real files: the chain verifies, every kind of tampering is named, rotation and restarts keep it."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from tiergate.audit import GENESIS_HASH, AuditLog, verify, verify_command
from tiergate.settings import AuditSettings


def _settings(tmp_path: Path, **overrides: Any) -> AuditSettings:
    return AuditSettings(path=tmp_path / "audit.log", **overrides)


def _record(i: int) -> dict[str, Any]:
    """A gateway line as the server writes it."""
    return {
        "time": f"2026-11-24T12:00:{i % 60:02d}+00:00",
        "request_id": f"req-{i}",
        "client": "acme",
        "model": "tiergate-intent",
        "model_version": "3",
        "rows": i,
        "rows_per_tier": {"edge": i, "cloud": 0},
        "escalations": {"low_confidence": 0},
        "degraded": False,
        "status": "OK",
        "latency_ms": 1.25,
    }


def _write(settings: AuditSettings, count: int, start: int = 1) -> None:
    with AuditLog(settings) as log:
        for i in range(start, start + count):
            log.write(_record(i))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _chained(seq: int, prev_line: bytes, **fields: Any) -> bytes:
    """A forged line that carries the right seq and the hash of `prev_line`."""
    prev = hashlib.sha256(prev_line.rstrip(b"\n")).hexdigest()
    return json.dumps({"seq": seq, "prev": prev, **fields}, separators=(",", ":")).encode() + b"\n"


def test_lines_are_chained_json_and_verify(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _write(settings, 5)
    lines = _lines(tmp_path / "audit.log")

    parsed = [json.loads(line) for line in lines]
    assert [p["seq"] for p in parsed] == [1, 2, 3, 4, 5]
    assert parsed[0]["prev"] == GENESIS_HASH
    for before, line in zip(lines, parsed[1:], strict=False):
        assert line["prev"] == hashlib.sha256(before.rstrip(b"\n")).hexdigest()
    assert list(parsed[2])[:4] == ["seq", "prev", "time", "request_id"]
    assert parsed[2]["rows_per_tier"] == {"edge": 3, "cloud": 0}

    result = verify(tmp_path / "audit.log")
    assert result.ok and result.lines == 5 and result.kind is None
    assert result.message == "OK: 5 lines, seq 1–5, in 1 file"


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path), 6)
    path = tmp_path / "audit.log"
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"client":"acme"', b'"client":"evil"')
    path.write_bytes(b"".join(lines))

    result = verify(path)
    assert not result.ok and result.kind == "edited"
    assert (result.file, result.line, result.lines) == (path, 3, 3)
    assert result.message == (
        "line 4 of audit.log: its prev does not match the hash of line 3 "
        "(line 3 was edited, or a line was inserted before line 4)"
    )


def test_a_line_edited_into_bad_json_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path), 6)
    path = tmp_path / "audit.log"
    lines = _lines(path)
    lines[3] = lines[3][:40] + b"\n"
    path.write_bytes(b"".join(lines))

    result = verify(path)
    assert (result.ok, result.kind, result.line) == (False, "edited", 4)
    assert result.message.startswith("line 4 of audit.log: not an audit line (bad JSON")


def test_a_deleted_line_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path), 6)
    path = tmp_path / "audit.log"
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))

    result = verify(path)
    assert (result.ok, result.kind, result.line) == (False, "deleted", 3)
    assert result.message == "line 3 of audit.log: seq 4 follows seq 2 of line 2: 1 line (seq 3) was deleted"


def test_an_inserted_line_is_named_even_when_forged_with_the_right_seq_and_prev(tmp_path: Path) -> None:
    _write(_settings(tmp_path), 6)
    path = tmp_path / "audit.log"
    lines = _lines(path)
    lines.insert(3, _chained(4, lines[2], request_id="req-forged", client="acme"))
    path.write_bytes(b"".join(lines))

    result = verify(path)
    assert (result.ok, result.kind, result.line) == (False, "inserted", 4)
    assert result.message == (
        "line 4 of audit.log was inserted: line 5 chains to line 3 (seq 4 and its hash), skipping the lines in between"
    )


def test_an_inserted_line_of_garbage_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path), 6)
    path = tmp_path / "audit.log"
    lines = _lines(path)
    lines.insert(3, b'{"seq": 40, "note": "nothing to see"}\n')
    path.write_bytes(b"".join(lines))

    result = verify(path)
    assert (result.ok, result.kind, result.line) == (False, "inserted", 4)
    assert result.message == "line 4 of audit.log was inserted: the line after it chains to line 3 (seq 4 and its hash)"


def test_rotation_keeps_the_chain_and_drops_the_oldest_beyond_backups(tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_bytes=700, backups=3)
    _write(settings, 40)
    path = tmp_path / "audit.log"

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(p.stat().st_size <= 700 for p in tmp_path.iterdir())
    # Each new file opens with the hash of the last line of the file before it.
    last_of_1 = _lines(tmp_path / "audit.log.1")[-1]
    first_of_live = json.loads(_lines(path)[0])
    assert first_of_live["prev"] == hashlib.sha256(last_of_1.rstrip(b"\n")).hexdigest()
    assert first_of_live["seq"] == json.loads(last_of_1)["seq"] + 1

    # The oldest surviving file's first line points into a dropped file: it is trusted as the anchor.
    result = verify(path)
    anchor = json.loads(_lines(tmp_path / "audit.log.3")[0])["seq"]
    assert anchor > 1
    assert result.ok and result.lines == 40 - anchor + 1
    assert result.files == tuple(tmp_path / n for n in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log"))
    assert result.message == (
        f"OK: {result.lines} lines, seq {anchor}–40, in 4 files; "
        f"anchored at line 1 of audit.log.3 (seq {anchor}): earlier lines were rotated away"
    )


def test_a_deleted_rotated_file_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path, max_bytes=700, backups=5), 20)
    (tmp_path / "audit.log.2").unlink()

    result = verify(tmp_path / "audit.log")
    assert (result.ok, result.kind, result.file, result.line) == (False, "deleted", tmp_path / "audit.log.1", 1)
    assert result.message.startswith("line 1 of audit.log.1: seq ")
    assert result.message.endswith("were deleted: rotated file audit.log.2 was deleted")


def test_an_edit_across_a_file_boundary_is_named(tmp_path: Path) -> None:
    _write(_settings(tmp_path, max_bytes=700, backups=5), 12)
    older = tmp_path / "audit.log.2"
    lines = _lines(older)
    lines[-1] = lines[-1].replace(b'"degraded":false', b'"degraded":true')
    older.write_bytes(b"".join(lines))

    result = verify(tmp_path / "audit.log")
    assert (result.kind, result.file, result.line) == ("edited", older, len(lines))
    n = len(lines)
    assert result.message == (
        f"line 1 of audit.log.1: its prev does not match the hash of line {n} of audit.log.2 "
        f"(line {n} of audit.log.2 was edited, or a line was inserted before line 1 of audit.log.1)"
    )


def test_a_restart_resumes_the_chain(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _write(settings, 3)
    with AuditLog(settings) as log:
        assert log.head[0] == 3
        assert log.write(_record(4)) == 4
    assert json.loads(_lines(tmp_path / "audit.log")[3])["seq"] == 4
    assert verify(tmp_path / "audit.log").message == "OK: 4 lines, seq 1–4, in 1 file"


def test_a_restart_after_rotation_resumes_from_the_rotated_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _write(settings, 3)
    (tmp_path / "audit.log").rename(tmp_path / "audit.log.1")  # as if stopped right after a rotation

    _write(settings, 2, start=4)
    result = verify(tmp_path / "audit.log")
    assert result.ok and result.message == "OK: 5 lines, seq 1–5, in 2 files"


def test_a_torn_last_line_is_reported_and_cut_off_on_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(tmp_path)
    _write(settings, 3)
    path = tmp_path / "audit.log"
    with path.open("ab") as f:
        f.write(b'{"seq":4,"prev":"ab')

    result = verify(path)
    assert (result.ok, result.kind, result.line, result.lines) == (False, "torn", 4, 3)
    assert result.message == (
        "line 4 of audit.log: the last line is incomplete (no newline): a torn final write, "
        "e.g. a crash mid-write; the 3 lines before it verify"
    )

    with caplog.at_level(logging.WARNING, logger="tiergate.audit"):
        _write(settings, 1, start=4)
    assert "torn write (19 bytes" in caplog.text
    assert verify(path).message == "OK: 4 lines, seq 1–4, in 1 file"


@pytest.mark.parametrize(
    "record",
    [
        {"text": "hello"},
        {"texts": ["hello"]},
        {"Authorization": "Bearer x"},
        {"payload": b"..."},
        {"client": "acme", "hop": {"token": "t"}},
        {"keys": [1]},
        {"rows": [{"key": "k"}]},
    ],
)
def test_denied_fields_are_refused_at_any_depth(tmp_path: Path, record: dict[str, Any]) -> None:
    with AuditLog(_settings(tmp_path)) as log, pytest.raises(ValueError, match="never audited"):
        log.write(record)
    assert (tmp_path / "audit.log").read_bytes() == b""


def test_reserved_fields_and_unencodable_values_are_refused_and_allowed_ones_pass(tmp_path: Path) -> None:
    with AuditLog(_settings(tmp_path)) as log:
        with pytest.raises(ValueError, match=r"may not set \['seq'\]"):
            log.write({"seq": 7})
        with pytest.raises(ValueError, match="Out of range float"):
            log.write({"latency_ms": float("nan")})
        assert log.write({"key_id": "k1", "request_id": "r", "rows": 2, "status": "OK", "latency_ms": 3.0}) == 1
    assert verify(tmp_path / "audit.log").ok


def test_close_keeps_every_record_and_later_writes_raise(tmp_path: Path) -> None:
    log = AuditLog(_settings(tmp_path))
    threads = [threading.Thread(target=lambda: [log.write(_record(i)) for i in range(50)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.write(_record(1))
    assert len(_lines(tmp_path / "audit.log")) == 200
    assert verify(tmp_path / "audit.log").lines == 200


def test_a_disabled_log_cannot_be_opened() -> None:
    with pytest.raises(ValueError, match=r"audit\.path is not set"):
        AuditLog(AuditSettings())


def test_verify_command_prints_one_line_and_returns_its_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.log"
    _write(_settings(tmp_path), 3)
    assert verify_command(path) == 0
    assert capsys.readouterr().out == f"{path}: OK: 3 lines, seq 1–3, in 1 file\n"

    lines = _lines(path)
    path.write_bytes(lines[0] + lines[2])
    assert verify_command(str(path)) == 1
    out = capsys.readouterr().out
    assert out == f"{path}: BROKEN: line 2 of audit.log: seq 3 follows seq 1 of line 1: 1 line (seq 2) was deleted\n"

    assert verify_command(tmp_path / "nothing.log") == 1
    assert capsys.readouterr().out.endswith("nothing.log: BROKEN: no audit log here, live or rotated\n")


def test_no_backups_rotates_into_nothing_and_the_chain_still_verifies(tmp_path: Path) -> None:
    _write(_settings(tmp_path, max_bytes=700, backups=0), 9)
    assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]
    result = verify(tmp_path / "audit.log")
    assert result.ok and result.lines == 1
    assert result.message.endswith("anchored at line 1 of audit.log (seq 9): earlier lines were rotated away")


def test_a_log_whose_last_line_was_edited_is_not_resumed(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _write(settings, 3)
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(_lines(path)[:2]) + b"not json\n")
    with pytest.raises(ValueError, match=r"cannot resume the audit log: the last line of .* is not an audit line"):
        AuditLog(settings)
