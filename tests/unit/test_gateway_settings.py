"""Gateway settings come from the environment with bounds, and errors name the variable and the value."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.gateway.settings import GatewaySettings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("TURBOSERVE_MODEL", "TURBOSERVE_GATEWAY_PORT", "TURBOSERVE_CREDIT_CHUNKS", "TURBOSERVE_QUEUE_CHUNKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TURBOSERVE_TOKENS", "dev=dev-token")
    return monkeypatch


def test_defaults_follow_the_documented_values(env: pytest.MonkeyPatch) -> None:
    settings = GatewaySettings.from_env()
    assert (settings.host, settings.port, settings.max_sessions_per_token) == ("127.0.0.1", 8080, 4)
    assert (settings.credit_chunks, settings.linger_s, settings.max_prompt_chars) == (2, 60.0, 2000)
    assert (settings.frame_width_px, settings.frame_height_px) == (32, 32)
    assert settings.tokens.owner_of("dev-token") == "dev"


def test_port_zero_is_allowed_for_tests(env: pytest.MonkeyPatch) -> None:
    env.setenv("TURBOSERVE_GATEWAY_PORT", "0")
    assert GatewaySettings.from_env().port == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [("TURBOSERVE_GATEWAY_PORT", "70000"), ("TURBOSERVE_CREDIT_CHUNKS", "0"), ("TURBOSERVE_LINGER_S", "soon"),
     ("TURBOSERVE_MAX_MESSAGE_BYTES", "100000"), ("TURBOSERVE_MAX_SESSIONS_PER_TOKEN", "0")],
)
def test_an_out_of_bounds_value_is_a_config_error_naming_it(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        GatewaySettings.from_env()


def test_a_queue_shallower_than_the_credit_window_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("TURBOSERVE_CREDIT_CHUNKS", "4")
    env.setenv("TURBOSERVE_QUEUE_CHUNKS", "2")
    with pytest.raises(ConfigError, match="TURBOSERVE_QUEUE_CHUNKS"):
        GatewaySettings.from_env()


def test_missing_tokens_refuse_to_start_rather_than_admit_everybody(env: pytest.MonkeyPatch) -> None:
    env.delenv("TURBOSERVE_TOKENS")
    with pytest.raises(ConfigError, match="TURBOSERVE_TOKENS"):
        GatewaySettings.from_env()


def test_an_unknown_model_needs_an_explicit_frame_size(env: pytest.MonkeyPatch) -> None:
    env.setenv("TURBOSERVE_MODEL", "my-finetune")
    with pytest.raises(ConfigError, match="TURBOSERVE_FRAME_WIDTH"):
        GatewaySettings.from_env()
    env.setenv("TURBOSERVE_FRAME_WIDTH", "832")
    env.setenv("TURBOSERVE_FRAME_HEIGHT", "480")
    assert GatewaySettings.from_env().frame_width_px == 832
