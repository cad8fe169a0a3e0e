"""State store settings come from the environment once, with bounds that name the offending variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError
from services.state_store.settings import StateStoreSettings


def test_the_defaults_use_the_jetstream_object_store(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKEND", "BUCKET", "DIR", "RETENTION_S", "SWEEP_INTERVAL_S", "STAGING_TIMEOUT_S"):
        monkeypatch.delenv(f"TURBOSERVE_SNAPSHOT_{name}", raising=False)
    settings = StateStoreSettings.from_env()
    assert settings.location.backend == "jetstream" and settings.location.name == "turboserve_snapshots"
    assert settings.retention_s == 3600.0 and settings.staging_timeout_s == 900.0


def test_the_directory_backend_is_located_by_its_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TURBOSERVE_SNAPSHOT_BACKEND", "directory")
    monkeypatch.setenv("TURBOSERVE_SNAPSHOT_DIR", str(tmp_path))
    assert StateStoreSettings.from_env().location.name == str(tmp_path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TURBOSERVE_SNAPSHOT_BACKEND", "s3", "TURBOSERVE_SNAPSHOT_BACKEND='s3'"),
        ("TURBOSERVE_SNAPSHOT_BUCKET", "a.b", "TURBOSERVE_SNAPSHOT_BUCKET='a.b'"),
        ("TURBOSERVE_SNAPSHOT_RETENTION_S", "-1", "out of bounds"),
        ("TURBOSERVE_SNAPSHOT_STAGING_TIMEOUT_S", "1", "out of bounds"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        StateStoreSettings.from_env()
