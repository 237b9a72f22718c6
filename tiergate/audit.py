"""The tamper-evident audit log: hash-chained JSON lines, rotated without breaking the chain, and their verifier.

Each line is one JSON object, ``{"seq": N, "prev": "<hex>", ...the record's fields}``, where ``seq`` counts
lines from 1 across rotations and ``prev`` is the sha256 of the previous line's exact bytes (without its
newline), or of ``GENESIS`` for the very first line. Editing, inserting or deleting a line therefore breaks
the chain at that point, and `verify` names the line.

What the servers write, one line each (field names are the callers'; this module only chains them):

- gateway, per request: ``time``, ``request_id``, ``client``, ``model``, ``model_version``, ``rows``,
  ``rows_per_tier`` (``{"edge": n, "cloud": m}``), ``escalations`` (reason -> rows), ``degraded``,
  ``status``, ``latency_ms``;
- cloud, per hop request: ``time``, ``request_id``, ``key_id``, ``rows``, ``status``, ``latency_ms``.

Never the payload text, a token or key material: `AuditLog.write` refuses records with a field named in
`DENIED_FIELDS`, at any depth, as a guard for callers.

Limits of a keyless chain, stated so nobody relies on more: someone who rewrites every line after an edit
(recomputing the hashes) is not detected, and neither is cutting lines off the end of the newest file or
the beginning of the oldest one. Copy `AuditLog.head` somewhere else now and then to pin the end.
One process writes one file: each server gets its own path.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tiergate.settings import AuditSettings

logger = logging.getLogger(__name__)

GENESIS = b"tiergate audit log v1"
GENESIS_HASH = hashlib.sha256(GENESIS).hexdigest()

# Lower-cased field names refused at any depth of a record.
DENIED_FIELDS = frozenset({"text", "texts", "token", "authorization", "key", "keys", "payload"})
RESERVED_FIELDS = frozenset({"seq", "prev"})

# How many recent lines the verifier remembers to find which line an insertion skipped over.
_LOOKBACK = 64
_TAIL_CHUNK = 8192


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _rotated_files(path: Path) -> list[tuple[int, Path]]:
    """The rotated files PATH.1, PATH.2, ... that exist, by number (gaps kept: they are evidence)."""
    if not path.parent.is_dir():
        return []
    prefix = path.name + "."
    found: list[tuple[int, Path]] = []
    for candidate in path.parent.iterdir():
        suffix = candidate.name[len(prefix) :] if candidate.name.startswith(prefix) else ""
        if suffix.isdigit() and str(int(suffix)) == suffix and int(suffix) > 0 and candidate.is_file():
            found.append((int(suffix), candidate))
    return sorted(found)


def _numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def _check_fields(value: object, where: str = "record") -> None:
    if isinstance(value, Mapping):
        for name, inner in value.items():
            if not isinstance(name, str):
                raise ValueError(f"audit {where} has a non-string field name {name!r}")
            if name.lower() in DENIED_FIELDS:
                raise ValueError(
                    f"audit {where} has a field named {name!r}: payloads, tokens and keys are never audited"
                )
            _check_fields(inner, f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for item in value:
            _check_fields(item, where)


def _parse(body: bytes) -> tuple[int, str] | None:
    """The (seq, prev) of an audit line, or None when it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:  # bad JSON or bad UTF-8
        return None
    if not isinstance(obj, dict):
        return None
    seq, prev = obj.get("seq"), obj.get("prev")
    if type(seq) is not int or not isinstance(prev, str) or len(prev) != 64:
        return None
    return seq, prev


def _last_line(path: Path) -> tuple[bytes | None, int]:
    """The last complete line of `path` (without its newline) and the offset where complete lines end.

    Reads backwards from the end in chunks, so resuming costs the size of the tail, not of the file.
    Bytes after the returned offset are a torn write (no newline).
    """
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        end: int | None = None
        while True:
            if end is None:
                newline = buf.rfind(b"\n")
                if newline >= 0:
                    end = pos + newline + 1
            if end is not None:
                start = buf.rfind(b"\n", 0, end - 1 - pos)
                if start >= 0 or pos == 0:
                    return buf[start + 1 : end - 1 - pos], end
            elif pos == 0:
                return None, 0
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf


class AuditLog:
    """Appends hash-chained JSON lines to ``settings.path``, rotating at ``settings.max_bytes``.

    On open it resumes the chain from the last line already on disk (a restart does not break it); a
    torn final line left by a crash is cut off with a warning, since no record was completed there.
    Safe to call from the event loop and from threads.
    """

    def __init__(self, settings: AuditSettings) -> None:
        if settings.path is None:
            raise ValueError("the audit log is off (audit.path is not set)")
        if settings.max_bytes <= 0 or settings.backups < 0:
            raise ValueError("audit.max_bytes must be positive and audit.backups zero or more")
        self._path = Path(settings.path)
        self._max_bytes = settings.max_bytes
        self._backups = settings.backups
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = self._resume()
        self._fd: int | None = self._open()
        self._size = os.fstat(self._fd).st_size

    @property
    def path(self) -> Path:
        return self._path

    @property
    def head(self) -> tuple[int, str]:
        """The seq and hash of the last line written: copy it elsewhere to pin the end of the chain."""
        with self._lock:
            return self._seq, self._prev

    def write(self, record: Mapping[str, Any]) -> int:
        """Append one record as one chained line and return its seq.

        Raises ValueError for a denied or reserved field name or a NaN, TypeError for a value JSON cannot carry.
        """
        _check_fields(record)
        reserved = RESERVED_FIELDS & record.keys()
        if reserved:
            raise ValueError(f"audit record may not set {sorted(reserved)}: the log assigns them")
        with self._lock:
            if self._fd is None:
                raise ValueError(f"audit log {self._path} is closed")
            seq = self._seq + 1
            line = {"seq": seq, "prev": self._prev, **record}
            body = json.dumps(line, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
            data = body + b"\n"
            if self._size > 0 and self._size + len(data) > self._max_bytes:
                self._rotate()
            self._append(data)
            self._seq, self._prev = seq, _digest(body)
            return seq

    def close(self) -> None:
        """Flush the file to disk and close it; later writes raise. Safe to call twice."""
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self) -> int:
        # 0600: the log names clients and keys by id; it is nobody else's business.
        return os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _append(self, data: bytes) -> None:
        # One unbuffered write(2) of one line, no fsync: the bytes are in the kernel when write() returns,
        # so a crash of this process loses nothing, and it costs microseconds, which the event loop can
        # afford (a thread and queue would cost more than the write, and could lose records on a crash).
        # fsync per line would stall the loop for milliseconds on real disks; only a power loss can cost
        # the last lines, and that shows as a torn or short tail, which `verify` reports. close() fsyncs.
        assert self._fd is not None
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError:
            if written:  # never leave half a line for the next one to be glued to
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    logger.exception("could not remove a partial audit line from %s", self._path)
            raise
        self._size += written

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)  # once per file: the rotated file is complete on disk before it is renamed
        os.close(self._fd)
        try:
            for n, older in reversed(_rotated_files(self._path)):
                if n >= self._backups:
                    older.unlink()
                else:
                    os.replace(older, _numbered(self._path, n + 1))
            if self._backups > 0:
                os.replace(self._path, _numbered(self._path, 1))
            else:
                self._path.unlink()
        except OSError:
            # Keep auditing into the current file; the next write tries again. The chain is unaffected.
            logger.exception("could not rotate the audit log %s", self._path)
        finally:
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size

    def _resume(self) -> tuple[int, str]:
        """The seq and hash to continue from: the last line of the newest non-empty file, else genesis."""
        candidates = [self._path, *(p for _, p in _rotated_files(self._path))]
        for candidate in candidates:
            if not candidate.exists():
                continue
            body, end = _last_line(candidate)
            size = candidate.stat().st_size
            if end < size:
                if candidate != self._path:
                    raise ValueError(f"cannot resume the audit log: {candidate} ends in a partial line")
                logger.warning(
                    "audit log %s ended in a torn write (%d bytes, no newline); cut off before resuming",
                    candidate,
                    size - end,
                )
                os.truncate(candidate, end)
            if body is None:
                continue
            parsed = _parse(body)
            if parsed is None:
                raise ValueError(
                    f"cannot resume the audit log: the last line of {candidate} is not an audit line; "
                    f"run `tiergate audit verify {self._path}`"
                )
            return parsed[0], _digest(body)
        return 0, GENESIS_HASH


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify`: intact, or the first problem found in chain order."""

    ok: bool
    # One line for a person: "OK: ..." or what is wrong and where.
    message: str
    # Lines that verified before the first problem (all of them when ok).
    lines: int
    # The files checked, oldest first.
    files: tuple[Path, ...]
    # edited, inserted, deleted, torn or missing; None when ok.
    kind: str | None = None
    # The line the problem points at: the edited line, the first inserted line, the line after a gap.
    file: Path | None = None
    line: int | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Line:
    file: Path
    number: int
    seq: int
    digest: str


def _at(file: Path, number: int, beside: Path | None = None) -> str:
    """`line N of FILE`, or just `line N` when it is mentioned beside a line of the same file."""
    return f"line {number}" if file == beside else f"line {number} of {file.name}"


def _read_lines(files: tuple[Path, ...]) -> Generator[tuple[Path, int, bytes]]:
    """Every line of `files` in order, as (file, line number, raw bytes with the newline if any)."""
    for file in files:
        with file.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                yield file, number, raw


def _links(raw: bytes | None, seq: int, digest: str) -> bool:
    """Whether `raw` is a complete audit line carrying `seq` and the hash `digest`."""
    if raw is None or not raw.endswith(b"\n"):
        return False
    return _parse(raw[:-1]) == (seq, digest)


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check the chain over PATH.N, ..., PATH.1, PATH in order; report OK or the first bad line.

    The first line of the oldest surviving file is the anchor: when rotation has dropped older files its
    `prev` refers to a line that no longer exists, so it is trusted as the start (if its seq is 1, its prev
    must be the genesis hash). Every later line must carry the next seq and the hash of the line before.
    """
    live = Path(path)
    rotated = _rotated_files(live)
    numbers = {p: n for n, p in rotated}
    numbers[live] = 0
    files = tuple([p for _, p in reversed(rotated)] + ([live] if live.is_file() else []))
    if not files:
        return VerifyResult(False, "no audit log here, live or rotated", 0, files, "missing", live)
    if not live.is_file():
        message = f"{live.name} is missing while {files[-1].name} exists: the live file was deleted or moved"
        return VerifyResult(False, message, 0, files, "missing", live)

    count = 0
    anchor: _Line | None = None
    previous: _Line | None = None
    recent: deque[_Line] = deque(maxlen=_LOOKBACK)

    def broken(kind: str, file: Path, number: int, message: str) -> VerifyResult:
        return VerifyResult(False, message, count, files, kind, file, number)

    with contextlib.closing(_read_lines(files)) as stream:
        for file, number, raw in stream:
            where = _at(file, number)
            if not raw.endswith(b"\n"):
                if file == live:
                    message = (
                        f"{where}: the last line is incomplete (no newline): a torn final write, "
                        f"e.g. a crash mid-write; the {count} lines before it verify"
                    )
                    return broken("torn", file, number, message)
                message = f"{where}: the file ends in a partial line: it was truncated or edited"
                return broken("edited", file, number, message)
            body = raw[:-1]
            parsed = _parse(body)
            if previous is None:
                if parsed is None:
                    message = f"{where}: not an audit line (bad JSON, or no seq/prev): it was edited"
                    return broken("edited", file, number, message)
                seq, prev = parsed
                if seq < 1 or (seq == 1 and prev != GENESIS_HASH):
                    message = f"{where}: seq {seq} should start the chain from the genesis hash: it was edited"
                    return broken("edited", file, number, message)
                previous = anchor = _Line(file, number, seq, _digest(body))
                recent.append(previous)
                count += 1
                continue

            before = _at(previous.file, previous.number, file)
            expected = previous.seq + 1
            if parsed is not None and parsed == (expected, previous.digest):
                previous = _Line(file, number, expected, _digest(body))
                recent.append(previous)
                count += 1
                continue

            # Something is wrong at this line. If the next line chains straight to the previous one,
            # this line is an insertion, whatever it holds.
            if _links(next(stream, (None, None, None))[2], expected, previous.digest):
                message = f"{where} was inserted: the line after it chains to {before} (seq {expected} and its hash)"
                return broken("inserted", file, number, message)
            if parsed is None:
                message = f"{where}: not an audit line (bad JSON, or no seq/prev): the line was edited"
                return broken("edited", file, number, message)
            seq, prev = parsed
            if prev == previous.digest:
                message = (
                    f"{where}: seq {seq} should be {expected}; its prev matches {before}, "
                    f"so no line is missing or inserted there: this line's seq was edited"
                )
                return broken("edited", file, number, message)
            if seq == expected:
                message = (
                    f"{where}: its prev does not match the hash of {before} "
                    f"({before} was edited, or a line was inserted before {_at(file, number, previous.file)})"
                )
                return broken("edited", previous.file, previous.number, message)
            if seq > expected:
                missing = seq - expected
                span = f"seq {expected}" if missing == 1 else f"seq {expected}–{seq - 1}"
                lines = "1 line" if missing == 1 else f"{missing} lines"
                verb = "was" if missing == 1 else "were"
                message = f"{where}: seq {seq} follows seq {previous.seq} of {before}: {lines} ({span}) {verb} deleted"
                if previous.file != file:
                    gone = range(numbers[file] + 1, numbers[previous.file])
                    if gone:
                        names = ", ".join(_numbered(live, n).name for n in reversed(gone))
                        message += (
                            f": rotated file {names} was deleted"
                            if len(gone) == 1
                            else f": rotated files {names} were deleted"
                        )
                    else:
                        message += f", from the end of {previous.file.name} or the start of {file.name}"
                return broken("deleted", file, number, message)
            # seq went back: look for the line this one really chains to; the lines after that were inserted.
            # Everything after `earlier` is in `recent` too, and `earlier` is not `previous` (its seq would
            # then be the expected one), so the line after it is there.
            for i in range(len(recent) - 2, -1, -1):
                earlier, first = recent[i], recent[i + 1]
                if earlier.digest == prev and earlier.seq + 1 == seq:
                    message = (
                        f"{_at(first.file, first.number)} was inserted: {_at(file, number, first.file)} "
                        f"chains to {_at(earlier.file, earlier.number, first.file)} (seq {seq} and its hash), "
                        f"skipping the lines in between"
                    )
                    return broken("inserted", first.file, first.number, message)
            message = (
                f"{where}: seq {seq} does not follow seq {previous.seq} of {before}: "
                f"a line was inserted before it, or one of them was edited"
            )
            return broken("inserted", file, number, message)

    if previous is None or anchor is None:
        return VerifyResult(True, f"OK: {live.name} is empty", 0, files)
    message = f"OK: {count} lines, seq {anchor.seq}–{previous.seq}, in {len(files)} file{'s' * (len(files) > 1)}"
    if anchor.seq > 1:
        message += (
            f"; anchored at {_at(anchor.file, anchor.number)} (seq {anchor.seq}): earlier lines were rotated away"
        )
    return VerifyResult(True, message, count, files)


def verify_command(path: str | os.PathLike[str]) -> int:
    """`tiergate audit verify FILE`: print one line; 0 when the chain is intact, 1 when it is broken."""
    result = verify(path)
    print(f"{Path(path)}: {result.message}" if result.ok else f"{Path(path)}: BROKEN: {result.message}")
    return 0 if result.ok else 1


# What the handler of the current RPC adds to its audit line (model, rows, tiers, key id, ...).
AUDIT_DETAILS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "tiergate_audit_details", default=None
)


def audit_detail(**fields: Any) -> None:
    """Add fields to the current RPC's audit line (nothing happens outside an audited RPC)."""
    details = AUDIT_DETAILS.get()
    if details is not None:
        details.update(fields)
