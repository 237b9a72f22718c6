"""Client tokens (stored as sha256 only, checked in constant time, scoped to models) and the reloader that lets
servers pick up a changed token file or keyring on file change or SIGHUP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from tiergate import tokens
from tiergate.envelope import Keyring
from tiergate.keys import KEYRING_FILE, TOKENS_FILE, init_key_dir, load_keyring, rotate_keyring
from tiergate.reload import FileWatch, on_sighup
from tiergate.tokens import Client, TokenFileError, TokenStore, write_private_file

REPO_ROOT = Path(__file__).resolve().parent.parent
# Bounded waits for the watch task; the tests never sleep for a fixed time.
WAIT_S = 5.0
INTERVAL_S = 0.01


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the token file --------------------------------------------------------------------------------------------


def test_add_stores_only_the_hash_and_the_token_authenticates(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = tokens.add(path, "shop", ["product-category"])
    other = tokens.add(path, "ops", ["*"])
    assert token != other and len(token) >= 43
    text = path.read_text(encoding="utf-8")
    assert token not in text and other not in text
    doc = json.loads(text)
    assert doc["clients"][0] == {
        "name": "shop",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "models": ["product-category"],
    }
    assert _mode(path) == 0o600

    store = TokenStore.load(path)
    assert store.authenticate(token) == Client("shop", ("product-category",))
    assert store.authenticate(other) == Client("ops", ("*",))
    assert store.authenticate(token + "x") is None
    assert store.authenticate("") is None
    assert store.get("ops") == Client("ops", ("*",))


def test_model_permissions() -> None:
    shop = Client("shop", ("product-category", "aisle"))
    assert shop.may_call("aisle") and shop.may_call("product-category")
    assert not shop.may_call("department")
    assert Client("ops", ("*",)).may_call("anything")


def test_a_duplicate_name_is_refused_and_revoke_removes_the_client(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = tokens.add(path, "shop", ["*"])
    kept = tokens.add(path, "ops", ["*"])
    with pytest.raises(TokenFileError, match=r"client 'shop' is already in .*tokens\.json; revoke it first"):
        tokens.add(path, "shop", ["*"])
    assert TokenStore.load(path).authenticate(first) is not None  # the refused add changed nothing

    tokens.revoke(path, "shop")
    store = TokenStore.load(path)
    assert store.authenticate(first) is None
    assert store.authenticate(kept) == Client("ops", ("*",))
    assert _mode(path) == 0o600
    with pytest.raises(TokenFileError, match=r"no client 'shop' in .*tokens\.json"):
        tokens.revoke(path, "shop")


@pytest.mark.parametrize(
    ("name", "models", "message"),
    [
        ("../evil", ["*"], "invalid client name"),
        ("", ["*"], "invalid client name"),
        ("has space", ["*"], "invalid client name"),
        ("shop", [], "give the models"),
        ("shop", [" ", ""], "give the models"),
    ],
)
def test_add_validates_its_arguments(tmp_path: Path, name: str, models: list[str], message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        tokens.add(tmp_path / "tokens.json", name, models)
    assert not (tmp_path / "tokens.json").exists()


def test_every_entry_is_compared_whichever_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.json"
    issued = [tokens.add(path, f"client-{i}", ["*"]) for i in range(5)]
    store = TokenStore.load(path)
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    # A spy, not a stand-in: the real comparison still decides.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    for index, token in [(0, issued[0]), (4, issued[4]), (None, "not-a-token")]:
        compared.clear()
        found = store.authenticate(token)
        assert (found.name if found else None) == (f"client-{index}" if index is not None else None)
        assert len(compared) == 5  # no early exit on a match


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("{not json", "Expecting property name"),
        ("[]", "version 1"),
        ('{"version": 1, "clients": {}}', "'clients' must be a list"),
        ('{"version": 1, "clients": [{"name": "a", "sha256": "zz", "models": ["*"]}]}', "sha256 must be 64"),
        ('{"version": 1, "clients": [{"name": "a", "sha256": "' + "0" * 64 + '", "models": []}]}', "models must be"),
        (
            '{"version": 1, "clients": ['
            + ",".join(['{"name": "a", "sha256": "' + "0" * 64 + '", "models": ["*"]}'] * 2)
            + "]}",
            "unique",
        ),
    ],
)
def test_a_malformed_token_file_is_reported_with_its_name(tmp_path: Path, text: str, detail: str) -> None:
    path = tmp_path / "bad-tokens.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenFileError, match=r"cannot read token file .*bad-tokens\.json: ") as caught:
        TokenStore.load(path)
    assert detail in str(caught.value)
    with pytest.raises(TokenFileError, match=r"bad-tokens\.json"):
        tokens.add(path, "new", ["*"])


def test_a_missing_token_file_is_reported_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"cannot read token file .*absent\.json"):
        TokenStore.load(tmp_path / "absent.json")


def test_private_writes_replace_atomically_at_0600(tmp_path: Path) -> None:
    path = tmp_path / "file.json"
    path.write_text("old", encoding="utf-8")
    path.chmod(0o644)
    write_private_file(path, "new")
    assert path.read_text(encoding="utf-8") == "new"
    assert _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]  # no temporary file left behind


# --- the command line ------------------------------------------------------------------------------------------


def test_tokens_add_prints_the_token_alone_on_stdout(tmp_path: Path) -> None:
    keys = init_key_dir(tmp_path / "keys")
    argv = ["tokens", "add", "shop", "--models", "product-category,aisle", "--keys", str(keys)]
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and result.stdout == lines[0] + "\n"
    token = lines[0]
    assert "added client shop" in result.stderr and token not in result.stderr
    client = TokenStore.load(keys / TOKENS_FILE).authenticate(token)
    assert client == Client("shop", ("product-category", "aisle"))


def test_tokens_revoke_and_errors_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.json"
    assert main(["tokens", "add", "ops", "--models", "*", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["tokens", "add", "ops", "--models", "*", "--file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "already in" in captured.err
    assert main(["tokens", "revoke", "ops", "--file", str(path)]) == 0
    assert TokenStore.load(path).authenticate(token) is None
    assert main(["tokens", "revoke", "ops", "--file", str(path)]) == 2
    assert "no client 'ops'" in capsys.readouterr().err


# --- reloading -------------------------------------------------------------------------------------------------


async def _next(queue: asyncio.Queue[TokenStore]) -> TokenStore:
    return await asyncio.wait_for(queue.get(), WAIT_S)


async def test_a_changed_token_file_is_picked_up_and_a_bad_one_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    first = tokens.add(path, "shop", ["*"])
    changes: asyncio.Queue[TokenStore] = asyncio.Queue()
    watch = FileWatch([path], lambda: TokenStore.load(path), changes.put_nowait, interval_s=INTERVAL_S)
    initial = watch.start()
    try:
        assert initial.authenticate(first) is not None

        second = tokens.add(path, "ops", ["*"])
        store = await _next(changes)
        assert store.authenticate(second) == Client("ops", ("*",))
        assert watch.current is store

        caplog.set_level(logging.ERROR, logger="tiergate.reload")
        write_private_file(path, "{broken")
        # One poll, run here rather than awaited from the task: no await between write and check, so no race.
        assert watch.check() is False
        assert watch.failures == 1
        assert watch.current is store  # the last good version stays
        assert changes.empty()
        assert any(str(path) in record.getMessage() for record in caplog.records)
        assert "keeping the last good version" in caplog.text

        tokens_text = TokenStore([(Client("ops", ("*",)), tokens.token_digest(second))]).render()
        write_private_file(path, tokens_text)
        recovered = await _next(changes)
        assert recovered.authenticate(first) is None and recovered.authenticate(second) is not None
    finally:
        await watch.stop()


async def test_trigger_reloads_without_a_change_and_stop_ends_the_task(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens.add(path, "shop", ["*"])
    loads: list[int] = []

    def load() -> TokenStore:
        loads.append(1)
        return TokenStore.load(path)

    changes: asyncio.Queue[TokenStore] = asyncio.Queue()
    # An interval far longer than the test: only the trigger can cause this reload.
    watch = FileWatch([path], load, changes.put_nowait, interval_s=3600)
    watch.start()
    watch.trigger()
    await _next(changes)
    assert len(loads) == 2 and watch.reloads == 1
    await watch.stop()
    await watch.stop()  # idempotent


async def test_sighup_reloads_the_keyring(tmp_path: Path) -> None:
    keys = init_key_dir(tmp_path / "keys")
    path = keys / KEYRING_FILE
    changes: asyncio.Queue[Keyring] = asyncio.Queue()
    watch = FileWatch([path], lambda: load_keyring(path), changes.put_nowait, interval_s=3600)
    before = watch.start()
    undo = on_sighup(watch.trigger)
    try:
        new_id = rotate_keyring(keys)
        os.kill(os.getpid(), signal.SIGHUP)
        keyring = await asyncio.wait_for(changes.get(), WAIT_S)
        assert keyring.active_key_id == new_id and before.active_key_id in keyring.keys
    finally:
        undo()
        await watch.stop()


async def test_a_failing_first_load_is_an_error_and_the_interval_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="interval_s"):
        FileWatch([path], lambda: TokenStore.load(path), lambda _: None, interval_s=0)
    watch = FileWatch([path], lambda: TokenStore.load(path), lambda _: None)
    with pytest.raises(TokenFileError, match=r"absent\.json"):
        watch.start()
    await watch.stop()
