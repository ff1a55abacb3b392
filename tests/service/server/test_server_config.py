"""Settings: precedence flags > KVTIER_* env > TOML file > defaults, human sizes, engine mirror."""

from __future__ import annotations

import dataclasses

import pydantic
import pytest

from kvtier.service.server.config import Settings, StoreSettings
from kvtier.tiering.config import StoreConfig

TOML = """
log_level = "DEBUG"

[server]
port = 7000
grace_s = 3

[store]
warm_capacity = "512MiB"
cold_capacity = "1GiB"
policy = "s3fifo"
"""


@pytest.fixture
def toml_file(tmp_path, monkeypatch):
    for var in ("KVTIER_CONFIG", "KVTIER_LOG_LEVEL", "KVTIER_SERVER__PORT", "KVTIER_STORE__WARM_CAPACITY",
                "KVTIER_STORE__POLICY", "KVTIER_STORE__HOT_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "kvtier.toml"
    path.write_text(TOML)
    return path


def test_defaults(toml_file):
    s = Settings.load()
    assert (s.server.host, s.server.port, s.server.max_concurrent_rpcs, s.server.port_file) == \
        ("127.0.0.1", 50051, 64, None)
    assert s.store.to_store_config() == StoreConfig(data_dir="kvtier-data")
    assert (s.telemetry.traces, s.telemetry.metrics_port, s.log_level) == (False, 0, "INFO")


def test_toml_over_defaults(toml_file):
    s = Settings.load(toml_file)
    assert (s.server.port, s.server.grace_s, s.log_level) == (7000, 3.0, "DEBUG")
    assert (s.store.warm_capacity, s.store.cold_capacity, s.store.policy) == (512 << 20, 1 << 30, "s3fifo")
    assert s.server.host == "127.0.0.1"  # untouched fields keep their defaults


def test_env_over_toml_and_flags_over_env(toml_file, monkeypatch):
    monkeypatch.setenv("KVTIER_CONFIG", str(toml_file))  # the file named by env, not by a flag
    monkeypatch.setenv("KVTIER_SERVER__PORT", "7100")
    monkeypatch.setenv("KVTIER_STORE__WARM_CAPACITY", "3GiB")
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "WARNING")
    s = Settings.load()
    assert (s.server.port, s.store.warm_capacity, s.log_level) == (7100, 3 << 30, "WARNING")
    assert s.store.policy == "s3fifo"  # from the TOML, env says nothing
    s = Settings.load(server={"port": 7200, "host": None}, store={"warm_capacity": "1.5GiB"}, log_level=None)
    assert (s.server.port, s.store.warm_capacity, s.log_level) == (7200, int(1.5 * (1 << 30)), "WARNING")
    assert s.server.grace_s == 3.0 and s.store.cold_capacity == 1 << 30


def test_human_sizes_and_validation(toml_file):
    s = Settings.load(store={"hot_capacity": "64MiB", "cold_capacity": "2GB", "warm_capacity": 1024})
    cfg = s.store.to_store_config()
    assert (cfg.hot_capacity, cfg.cold_capacity, cfg.warm_capacity) == (64 << 20, 2_000_000_000, 1024)
    with pytest.raises(pydantic.ValidationError, match="policy"):
        Settings.load(store={"policy": "fifo"})
    with pytest.raises(pydantic.ValidationError, match="warm_capacity"):
        Settings.load(store={"warm_capacity": "lots"})
    with pytest.raises(FileNotFoundError):
        Settings.load(toml_file.with_name("missing.toml"))


def test_store_settings_mirror_every_engine_field():
    engine = {f.name: f.default for f in dataclasses.fields(StoreConfig) if f.name != "remote"}  # [remote]
    assert set(StoreSettings.model_fields) == set(engine)
    mirrored = dataclasses.asdict(StoreSettings().to_store_config())
    assert mirrored == {**engine, "data_dir": "kvtier-data", "remote": None}


def test_remote_settings_mirror_every_remote_field():
    from kvtier.service.server.config import RemoteSettings
    from kvtier.tiering.remote import RemoteConfig

    assert set(RemoteSettings.model_fields) == {f.name for f in dataclasses.fields(RemoteConfig)} | {"password_file"}
    engine = RemoteConfig(seeds=("h:1",))
    assert RemoteSettings(seeds=["h:1"]).to_remote_config() == engine and RemoteSettings().to_remote_config() is None
