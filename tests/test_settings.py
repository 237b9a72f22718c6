"""Settings: defaults, TOML file, then TIERGATE_* environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiergate.settings import load_settings


def test_defaults() -> None:
    settings = load_settings(env={})
    assert settings.gateway.chain == ["edge", "cloud"]
    assert settings.gateway.routing.threshold is None


def test_file_then_env(tmp_path: Path) -> None:
    config = tmp_path / "tiergate.toml"
    config.write_text(
        '[gateway]\nport = 9000\nchain = ["edge"]\n[gateway.routing]\nthreshold = 0.3\n[cloud]\nport = 9100\n',
        encoding="utf-8",
    )
    env = {"TIERGATE_GATEWAY__ROUTING__THRESHOLD": "0.45", "TIERGATE_GATEWAY__ROUTING__ALLOW_CLIENT_HINT": "false"}
    settings = load_settings(config, env=env)
    assert settings.gateway.port == 9000
    assert settings.gateway.chain == ["edge"]
    assert settings.gateway.routing.threshold == pytest.approx(0.45)
    assert settings.gateway.routing.allow_client_hint is False
    assert settings.cloud.port == 9100


def test_env_list_and_path() -> None:
    settings = load_settings(env={"TIERGATE_GATEWAY__CHAIN": "edge, cloud", "TIERGATE_CLOUD__MODELS_DIR": "m/x"})
    assert settings.gateway.chain == ["edge", "cloud"]
    assert settings.cloud.models_dir == Path("m/x")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TIERGATE_GATEWAY__PORTT": "1"}, "unknown setting 'portt'"),
        ({"TIERGATE_GATEWAY__PORT": "abc"}, "cannot read 'abc' as int"),
        ({"TIERGATE_GATEWAY__ROUTING__ALLOW_CLIENT_HINT": "maybe"}, "expected a boolean"),
    ],
)
def test_bad_values_are_reported(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(env=env)
