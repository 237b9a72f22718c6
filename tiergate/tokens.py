"""The client token file: per client a name, the sha256 of its bearer token (never the token), and its models.

The file is JSON, readable by its owner only, and every write replaces it atomically, so a server
watching it (see `tiergate.reload`) never reads half a file:

    {"version": 1, "clients": [{"name": "shop-frontend", "sha256": "<64 hex>", "models": ["*"]}]}

`tiergate tokens add NAME --models M[,M...]` creates a client and prints its token once;
`tiergate tokens revoke NAME` removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_FILE_VERSION = 1
ALL_MODELS = "*"
# Client names double as certificate subjects and file names (`tiergate keys client-cert`).
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class TokenFileError(ValueError):
    """The token file cannot be read or the change asked of it cannot be made; the message names the file."""


def check_client_name(name: str) -> str:
    """`name` if it is a valid client name (letters, digits, `.`, `_`, `@`, `-`; up to 128), else ValueError."""
    if not CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"invalid client name {name!r}: use letters, digits, '.', '_', '@' or '-' (up to 128, "
            "starting with a letter or digit)"
        )
    return name


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, readable by its owner only.

    The text goes to a temporary file created at 0600 beside `path`, then `os.replace` swaps it in:
    a reader sees the old file or the new one, never a mix, and the file is never readable by others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # The rename itself survives a crash only once the directory is synced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def token_digest(token: str) -> bytes:
    """The sha256 digest of a token, as the file stores it (in hex)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Client:
    """A client of the public port and the models it may call (`*`: all)."""

    name: str
    models: tuple[str, ...]

    def may_call(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


@dataclass(frozen=True)
class _Entry:
    client: Client
    digest: bytes


def render_token_file(entries: Iterable[tuple[Client, bytes]] = ()) -> str:
    """The JSON text of a token file holding `entries` (client, sha256 digest)."""
    clients = [
        {"name": client.name, "sha256": digest.hex(), "models": list(client.models)} for client, digest in entries
    ]
    return json.dumps({"version": TOKEN_FILE_VERSION, "clients": clients}, indent=2) + "\n"


def _parse_entry(item: Any, index: int) -> _Entry:
    if not isinstance(item, dict):
        raise ValueError(f"clients[{index}] is not an object")
    name, digest, models = item.get("name"), item.get("sha256"), item.get("models")
    if not isinstance(name, str):
        raise ValueError(f"clients[{index}] has no name")
    check_client_name(name)
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"client {name!r}: sha256 must be 64 lowercase hex digits")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"client {name!r}: models must be a non-empty list of model names (or '*')")
    return _Entry(Client(name, tuple(models)), bytes.fromhex(digest))


class TokenStore:
    """The clients of a token file, and the check of a presented bearer token against them."""

    def __init__(self, entries: Iterable[tuple[Client, bytes]] = ()) -> None:
        self._entries = tuple(_Entry(client, digest) for client, digest in entries)
        names = [entry.client.name for entry in self._entries]
        if len(set(names)) != len(names):
            raise ValueError("client names must be unique")

    @classmethod
    def parse(cls, text: str) -> TokenStore:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("version") != TOKEN_FILE_VERSION:
            raise ValueError(f"expected an object with version {TOKEN_FILE_VERSION}")
        items = doc.get("clients")
        if not isinstance(items, list):
            raise ValueError("'clients' must be a list")
        entries = [_parse_entry(item, index) for index, item in enumerate(items)]
        return cls((entry.client, entry.digest) for entry in entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read a token file; TokenFileError naming the file if it is missing or malformed."""
        try:
            return cls.parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise TokenFileError(f"cannot read token file {path}: {error}") from error

    @property
    def clients(self) -> tuple[Client, ...]:
        return tuple(entry.client for entry in self._entries)

    def get(self, name: str) -> Client | None:
        """The client called `name` (e.g. an mTLS subject CN), or None."""
        return next((entry.client for entry in self._entries if entry.client.name == name), None)

    def authenticate(self, token: str) -> Client | None:
        """The client whose token this is, or None.

        The digest is compared with every entry in constant time, and the loop never stops early,
        so the time taken does not tell which entry (or how much of one) matched.
        """
        if not token:
            return None
        digest = token_digest(token)
        found: Client | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.client
        return found

    def with_client(self, client: Client, digest: bytes) -> TokenStore:
        return TokenStore([*((e.client, e.digest) for e in self._entries), (client, digest)])

    def without(self, name: str) -> TokenStore:
        return TokenStore((e.client, e.digest) for e in self._entries if e.client.name != name)

    def render(self) -> str:
        return render_token_file((entry.client, entry.digest) for entry in self._entries)


def _load_for_update(path: Path) -> TokenStore:
    # `tokens add --file NEW` starts a file; revoking from a missing one is an error (below).
    return TokenStore.load(path) if path.exists() else TokenStore()


def add(path: Path, name: str, models: Sequence[str]) -> str:
    """Add client `name` allowed to call `models` (`*`: all) and return its new token.

    Only the token's sha256 is written; the token itself is returned once and stored nowhere.
    """
    try:
        check_client_name(name)
    except ValueError as error:
        raise TokenFileError(str(error)) from None
    wanted = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not wanted:
        raise TokenFileError("give the models the client may call (--models M[,M...], or '*' for all)")
    store = _load_for_update(path)
    if store.get(name) is not None:
        raise TokenFileError(f"client {name!r} is already in {path}; revoke it first to issue a new token")
    token = secrets.token_urlsafe(32)
    write_private_file(path, store.with_client(Client(name, wanted), token_digest(token)).render())
    return token


def revoke(path: Path, name: str) -> None:
    """Remove client `name`; its token stops working once the servers reload the file."""
    store = TokenStore.load(path)
    if store.get(name) is None:
        raise TokenFileError(f"no client {name!r} in {path}")
    write_private_file(path, store.without(name).render())
