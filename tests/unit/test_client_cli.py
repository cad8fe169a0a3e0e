"""`turboserve client` tells a user's mistake in one line and exits 2, instead of a traceback."""

from __future__ import annotations

import pytest

from services.cli import main as cli
from services.common.nats_server import free_port


@pytest.mark.parametrize(("url", "says"), [
    (f"ws://127.0.0.1:{free_port()}/ws", "cannot reach the gateway"),
    ("http://127.0.0.1:8080/ws", "is not a WebSocket URL"),
])
def test_an_unreachable_gateway_or_a_wrong_url_is_one_line_and_exit_code_2(
    url: str, says: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["client", "--url", url, "--token", "t", "--chunks", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("turboserve client: ") and says in err and "\n" not in err


def test_up_takes_the_port_flag_first_then_the_documented_setting_then_8080() -> None:
    from services.cli import gateway_port

    assert gateway_port(9000, {"TURBOSERVE_GATEWAY_PORT": "9100"}) == 9000
    assert gateway_port(None, {"TURBOSERVE_GATEWAY_PORT": "9100"}) == 9100
    assert gateway_port(None, {}) == 8080
