"""A service that cannot start on its settings says so in one line and exits 2, without a traceback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common.config import ConfigError
from services.common.service import run_service
from services.gpu_worker.model import MissingCheckpointFile
from services.gpu_worker.model.checkpoint_files import resolve_config


def test_a_config_error_at_start_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    async def main(_: asyncio.Event) -> None:
        raise ConfigError("TURBOSERVE_MAX_BATCH='abc' is not an integer")

    assert run_service("probe", main) == 2
    err = capsys.readouterr().err
    assert err.strip() == "turboserve probe: TURBOSERVE_MAX_BATCH='abc' is not an integer"


def test_an_unusable_model_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_config(tmp_path / "missing")
    assert isinstance(raised.value, MissingCheckpointFile) and "does not exist" in str(raised.value)
