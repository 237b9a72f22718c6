"""The model repository: each served model's versions on disk, which one serves, and new versions swapped in live.

A model's directory is either one built model (its `manifest.json` at the top: one fixed version), or a
directory of numbered versions `1/`, `2/`, ... each a built model. The newest version that verifies serves
requests that name no version; with `keep` N > 1 (0: all), the N newest that load serve requests naming them,
as Triton's `latest` version policy does.
A watch (or `load`, on request) notices a newer version, verifies it (every file's sha256 against its manifest),
loads it off the event loop and swaps it in at once: requests already running finish on the version they
started with, then the old version's own resources are released. A version that fails to verify or load is
refused with one log line and kept in the index as UNAVAILABLE with the reason; the old version keeps serving.

Transport-free: the servicer turns what this says into OIP messages and status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from tiergate.errors import ModelNotFoundError, NotReadyError, TiergateError
from tiergate.manifest import ManifestError
from tiergate.manifest import numbered_versions as manifest_versions
from tiergate.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


class State(StrEnum):
    """A version's state, as OIP's repository index names them."""

    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


class ModelLoadError(TiergateError):
    """A version on disk could not be verified or loaded; the message says why."""


class Served(Protocol):
    """What the repository needs of a loaded model version."""

    name: str
    version: str

    def ready(self) -> bool: ...

    async def retire(self, grace_s: float) -> None:
        """Wait (at most `grace_s`) for requests running on this version, then release what it alone holds."""
        ...


@dataclass(frozen=True)
class VersionState:
    """One version of one model, as the repository index reports it."""

    model: str
    version: str
    state: State
    reason: str = ""


def _version_order(version: str) -> tuple[int, str]:
    """Numbered versions in number order (a single built model's version string sorts as 0)."""
    return (int(version), "") if version.isdigit() else (0, version)


def numbered_versions(root: Path) -> list[tuple[int, Path]] | None:
    """`root`'s numbered version directories, oldest first; None when `root` is itself one built model."""
    try:
        return manifest_versions(root)
    except ManifestError as error:
        raise ModelLoadError(str(error)) from None


# Loads the model at a version directory as the given version (raises ModelLoadError or ManifestError).
Loader = Callable[[Path, str], Awaitable[Served]]


class ModelVersions:
    """One model's versions: the ones serving (the newest answers requests naming none), the ones refused, and
    the loading of newer ones."""

    def __init__(self, name: str, root: Path, load: Loader, *, grace_s: float = 30.0, keep: int = 1) -> None:
        if keep < 0:
            raise ValueError(f"serve_versions must be 0 (all) or more, got {keep}")
        self.name = name
        self.root = root
        self._load = load
        self._grace_s = grace_s
        self._keep = keep
        # Loaded versions by version string; the newest is `serving`.
        self._loaded: dict[str, Served] = {}
        self.unloaded = False
        self._refused: dict[str, str] = {}  # version -> reason
        self._loading: str | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def serving(self) -> Served | None:
        """The newest loaded version: the one that answers requests naming no version."""
        if not self._loaded:
            return None
        return self._loaded[max(self._loaded, key=_version_order)]

    def start_with(self, model: Served, refused: dict[str, str]) -> None:
        """Serve `model`, loaded at start-up, with the versions refused on the way there."""
        self._loaded[model.version] = model
        self._refused.update(refused)

    async def fill(self) -> None:
        """Load the older versions the version policy keeps (none with `keep` 1), newest first; one that fails
        is refused and skipped."""
        versions = numbered_versions(self.root)
        if versions is None or self._keep == 1:
            return
        async with self._lock:
            for number, path in reversed(versions):
                if self._keep and len(self._loaded) >= self._keep:
                    break
                version = str(number)
                if version in self._loaded or version in self._refused:
                    continue
                with contextlib.suppress(ModelLoadError):
                    self._loaded[version] = await self._try(path, version)

    @property
    def versioned(self) -> bool:
        """Whether the directory holds numbered versions (and so can gain new ones)."""
        return numbered_versions(self.root) is not None

    async def load(self, *, only_newer: bool = False) -> Served:
        """Serve the newest version that loads (with `only_newer`, only one newer than the serving one).

        A newer version that fails is refused (logged once, and skipped from then on) and the next older one is
        tried, down to the one serving. ModelLoadError when a version failed to load in this call (the serving
        one, if any, serves on) or when no version can serve.
        """
        async with self._lock:
            versions = numbered_versions(self.root)
            if versions is None:
                if self.serving is not None and only_newer:
                    return self.serving
                return await self._take(await self._try(self.root, ""))
            serving = int(self.serving.version) if self.serving is not None else -1
            failed: list[str] = []
            for number, path in reversed(versions):
                version = str(number)
                if number <= serving:
                    break  # never older than what serves; the serving one serves on (below)
                if version in self._refused:
                    continue  # refused once; a fixed version must come back under a new number
                try:
                    return await self._take(await self._try(path, version))
                except ModelLoadError as error:
                    failed.append(str(error))
                    continue
            if self.serving is not None:
                self.unloaded = False
                if failed:
                    raise ModelLoadError(f"{'; '.join(failed)}; version {self.serving.version} keeps serving")
                return self.serving
            reasons = "; ".join(f"version {v}: {why}" for v, why in sorted(self._refused.items())) or "none found"
            raise ModelLoadError(f"model {self.name!r} has no version that loads in {self.root} ({reasons})")

    async def _try(self, path: Path, version: str) -> Served:
        self._loading = version
        try:
            return await self._load(path, version)
        except Exception as error:  # a broken version is refused, never served, never fatal
            reason = str(error) or type(error).__name__
            self._refused[version] = reason
            logger.error("model %s version %s refused, the serving version stays: %s", self.name, version, reason)
            raise ModelLoadError(f"model {self.name!r} version {version} does not load: {reason}") from error
        finally:
            self._loading = None

    async def _take(self, model: Served) -> Served:
        old = self.serving
        replaced = self._loaded.get(model.version)
        self._loaded[model.version] = model
        self.unloaded = False
        if replaced is not None and replaced is not model:  # the same version string, loaded again
            self._retire(replaced)
        if old is not None and old is not model:
            logger.info("model %s now serves version %s (was %s)", self.name, model.version, old.version)
        # The version policy: the `keep` newest stay loaded (0: all); older ones retire once their requests end.
        ordered = sorted(self._loaded, key=_version_order)
        for version in ordered[: -self._keep] if self._keep else []:
            self._retire(self._loaded.pop(version))
        return model

    def _retire(self, model: Served) -> None:
        task = asyncio.ensure_future(model.retire(self._grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def unload(self) -> None:
        """Stop serving: requests get UNAVAILABLE until a load; the loaded version stays in memory."""
        self.unloaded = True

    def current(self, version: str = "") -> Served:
        """The version asked for (the newest when none is), as loaded now: requests keep the object they get
        here, so a version swapped in meanwhile never changes a request already running."""
        serving = self.serving
        if self.unloaded or serving is None:
            raise NotReadyError(
                f"model {self.name!r} is unloaded; load it with RepositoryModelLoad (tritonclient: load_model)"
            )
        if not version or version == serving.version:
            return serving
        model = self._loaded.get(version)
        if model is not None:
            return model
        on_disk = [state.version for state in self.index()]
        loaded = ", ".join(sorted(self._loaded, key=_version_order))
        if version in on_disk:
            serves = f"version {serving.version!r} serves" if len(self._loaded) == 1 else f"loaded: {loaded}"
            raise ModelNotFoundError(f"model {self.name!r} version {version!r} is not loaded; {serves}")
        raise ModelNotFoundError(
            f"model {self.name!r} has no version {version!r}; available: {', '.join(on_disk) or loaded}"
        )

    def loaded(self) -> list[Served]:
        """Every loaded version, oldest first."""
        return [self._loaded[version] for version in sorted(self._loaded, key=_version_order)]

    def index(self) -> list[VersionState]:
        """Every version on disk (or the one built model), with its state."""
        versions = numbered_versions(self.root)
        on_disk = [""] if versions is None else [str(number) for number, _ in versions]
        served = self.serving.version if self.serving is not None else None
        states = []
        for version in on_disk:
            shown = served if versions is None and served is not None else version
            if version == self._loading:
                states.append(VersionState(self.name, shown, State.LOADING))
            elif version in self._refused:
                states.append(VersionState(self.name, shown, State.UNAVAILABLE, self._refused[version]))
            elif shown in self._loaded and not self.unloaded:
                states.append(VersionState(self.name, shown, State.READY))
            elif shown in self._loaded:
                states.append(VersionState(self.name, shown, State.UNAVAILABLE, "unloaded"))
            else:
                states.append(VersionState(self.name, shown, State.UNAVAILABLE, "not loaded: a newer version serves"))
        return states

    async def close(self) -> None:
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ModelRepository:
    """Every served model by name, each with its versions; an optional watch loads newer versions as they land."""

    def __init__(self, models: list[ModelVersions], *, poll_s: float = 0.0) -> None:
        self._models = {model.name: model for model in models}
        self._poll_s = poll_s
        self._watch: asyncio.Task[None] | None = None

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> ModelVersions:
        model = self._models.get(name)
        if model is None:
            served = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here; available models: {served}")
        return model

    def current(self, name: str, version: str = "") -> Served:
        return self.versions(name).current(version)

    def served(self) -> list[Served]:
        """Every loaded version of every model (unloaded ones included: they still hold their resources)."""
        return [version for model in self._models.values() for version in model.loaded()]

    async def fill(self) -> None:
        """Load the older versions each model's version policy keeps."""
        for model in self._models.values():
            await model.fill()

    def index(self, ready_only: bool = False) -> list[VersionState]:
        states = [state for model in self._models.values() for state in model.index()]
        return [state for state in states if state.state is State.READY] if ready_only else states

    def start(self) -> None:
        """Watch for newer versions every `poll_s` seconds (0: only on request)."""
        if self._poll_s > 0 and self._watch is None:
            self._watch = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            for model in self._models.values():
                if model.unloaded:
                    continue  # an operator unloaded it: only a load request brings it back
                with contextlib.suppress(ModelLoadError):
                    await model.load(only_newer=True)

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        await cancel_and_wait(watch)
        for model in self._models.values():
            await model.close()
