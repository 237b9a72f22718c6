"""Pick up changed files (keyring, token file, certificates) without a restart: on file change or SIGHUP.

A `FileWatch` polls its files' mtime, size and inode on an asyncio task and, when they change or
`trigger()` is called (from a SIGHUP handler, see `on_sighup`), loads them again and hands the new
value to `on_change`. A load that fails is logged, naming the files, and the last good value stays:
a half-edited file never takes a server's keys or clients away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from tiergate.tasks import cancel_and_wait

T = TypeVar("T")
Stamp = tuple[tuple[int, int, int, int] | None, ...]
logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0


def _stamp(paths: Sequence[Path]) -> Stamp:
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            # The inode catches an atomic replace whose mtime and size happen to equal the old file's.
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(stamps)


class FileWatch(Generic[T]):
    """Reloads a value built from `paths` whenever they change, or on `trigger()`.

    `load` builds the value (and raises if the files are not valid); `on_change` receives each new
    value after a successful reload. Start with `start()` inside the event loop, which loads once and
    raises if that fails (a server must not start on bad files); stop with `await stop()`.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        load: Callable[[], T],
        on_change: Callable[[T], None],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        name: str | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.paths = tuple(Path(p) for p in paths)
        self.name = name or ", ".join(str(p) for p in self.paths)
        self._load = load
        self._on_change = on_change
        self._interval_s = interval_s
        self._stamp: Stamp | None = None
        self._current: T | None = None
        self._wake = asyncio.Event()
        self._forced = False
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.failures = 0

    @property
    def current(self) -> T | None:
        """The last value loaded and applied successfully (None before `start`)."""
        return self._current

    def start(self) -> T:
        """Load the files (errors propagate) and start watching them; call from a running event loop."""
        if self._task is not None:
            raise RuntimeError(f"the watch on {self.name} is already running")
        stamp = _stamp(self.paths)
        value = self._load()
        self._stamp, self._current = stamp, value
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch {self.name}")
        return value

    def trigger(self) -> None:
        """Reload now, changed or not (what SIGHUP does); call from the event loop's thread."""
        self._forced = True
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def check(self) -> bool:
        """One poll: reload if the files changed (or a reload was triggered); True if a new value was taken."""
        forced, self._forced = self._forced, False
        stamp = _stamp(self.paths)
        if not forced and stamp == self._stamp:
            return False
        # Remember the stamp even if the load fails: the error is logged once, and the next edit retries.
        self._stamp = stamp
        try:
            value = self._load()
        except Exception as error:
            self.failures += 1
            logger.error("cannot reload %s, keeping the last good version: %s", self.name, error)
            return False
        try:
            self._on_change(value)
        except Exception:
            self.failures += 1
            logger.exception("applying the reloaded %s failed", self.name)
            return False
        self._current = value
        self.reloads += 1
        logger.info("reloaded %s", self.name)
        return True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            self.check()


def on_sighup(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` (e.g. a watch's `trigger`) on SIGHUP in the running loop; returns the undo.

    Where the loop cannot take signal handlers (Windows, or not the main thread) this logs and does nothing.
    """
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as error:
        logger.warning("reload on SIGHUP is not available here (%s); files are still watched", error)
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo
