"""Settings: precedence flags > KVTIER_* env > TOML file > defaults, human sizes, engine mirror."""

from __future__ import annotations

import dataclasses

import pytest

from kvtier.service.server.config import Settings, SettingsError, StoreSettings
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
    with pytest.raises(SettingsError, match="policy"):
        Settings.load(store={"policy": "fifo"})
    with pytest.raises(SettingsError, match="warm_capacity"):
        Settings.load(store={"warm_capacity": "lots"})
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(toml_file.with_name("missing.toml"))


def test_store_settings_mirror_every_engine_field():
    engine = {f.name: f.default for f in dataclasses.fields(StoreConfig) if f.name != "remote"}  # [remote]
    # lossy_codecs is the server's policy (which tenants may choose a lossy cold codec), not an engine knob
    assert set(StoreSettings.model_fields) - {"lossy_codecs"} == set(engine)
    mirrored = dataclasses.asdict(StoreSettings().to_store_config())
    assert mirrored == {**engine, "data_dir": "kvtier-data", "remote": None}


def test_remote_settings_mirror_every_remote_field():
    from kvtier.service.server.config import RemoteSettings
    from kvtier.tiering.remote import RemoteConfig

    assert set(RemoteSettings.model_fields) == {f.name for f in dataclasses.fields(RemoteConfig)} | {"password_file"}
    engine = RemoteConfig(seeds=("h:1",))
    assert RemoteSettings(seeds=["h:1"]).to_remote_config() == engine and RemoteSettings().to_remote_config() is None


# ----------------------------------------------------------------------------------------------------
# issue 14, "typos are silently ignored": every problem is one line naming the setting and its source
def _error(**kw) -> str:
    with pytest.raises(SettingsError) as err:
        Settings.load(**kw)
    text = str(err.value)
    assert "\n" not in text and "pydantic" not in text, text
    return text


def test_unknown_toml_section_and_field_name_the_file_line_and_closest_name(toml_file):
    toml_file.write_text('log_level = "info"\n\n[stor]\nwarm_capacity = "1GiB"\n')
    assert _error(config_file=toml_file) == f"unknown setting 'stor' ({toml_file}:3); did you mean store?"
    toml_file.write_text('[server]\nport = 7000\n[store]\ncold_capacity = "1GiB"\nwarm_capacty = "1GiB"\n')
    assert _error(config_file=toml_file) == \
        f"unknown setting store.warm_capacty ({toml_file}:5); did you mean warm_capacity?"


def test_unknown_env_names_are_rejected_with_the_closest_valid_one(toml_file, monkeypatch):
    cases = {"KVTIER_STORE__WARM_CAPACTY": "did you mean KVTIER_STORE__WARM_CAPACITY?",
             "KVTIER_STOR__WARM_CAPACITY": "did you mean KVTIER_STORE__WARM_CAPACITY?",
             "KVTIER_STORE_WARM_CAPACITY": "did you mean KVTIER_STORE__WARM_CAPACITY?",
             "KVTIER_LOG_LEVL": "did you mean KVTIER_LOG_LEVEL?"}
    for name, hint in cases.items():
        monkeypatch.setenv(name, "1GiB")
        text = _error()
        assert f"(env {name})" in text and text.endswith(hint), text
        monkeypatch.delenv(name)
    monkeypatch.setenv("KVTIER_STRESS", "1")  # not shaped like a setting: another tool's variable
    monkeypatch.setenv("KVTIER_COLD_KEY", "00" * 32)
    assert Settings.load().store.warm_capacity == 2 << 30


def test_invalid_values_name_the_env_var_file_line_or_flag(toml_file, monkeypatch):
    monkeypatch.setenv("KVTIER_STORE__WARM_CAPACITY", "lots")
    assert _error().startswith("invalid setting store.warm_capacity (env KVTIER_STORE__WARM_CAPACITY): ")
    monkeypatch.delenv("KVTIER_STORE__WARM_CAPACITY")
    toml_file.write_text('[server]\nhost = "::1"\nport = 99999\n')
    assert _error(config_file=toml_file).startswith(f"invalid setting server.port ({toml_file}:3): ")
    assert _error(server={"grace_s": -1}).startswith("invalid setting server.grace_s (flag --grace-s): ")
    monkeypatch.setenv("KVTIER_SECURITY__TOKENS", "{not json")
    assert _error().startswith("env KVTIER_SECURITY__TOKENS: not valid JSON")


def test_bad_toml_names_the_file(toml_file):
    toml_file.write_text("[store\nwarm_capacity = 1\n")
    assert _error(config_file=toml_file).startswith(f"{toml_file}: invalid TOML: ")
    assert "does not exist" in _error(config_file=toml_file.with_name("missing.toml"))


def test_log_level_and_format_any_case_from_every_source(toml_file, monkeypatch):
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "debug")
    monkeypatch.setenv("KVTIER_LOG_FORMAT", "JSON")
    s = Settings.load()
    assert (s.log_level, s.log_format) == ("DEBUG", "json")
    monkeypatch.delenv("KVTIER_LOG_LEVEL")
    toml_file.write_text('log_level = "warning"\n')
    assert Settings.load(toml_file).log_level == "WARNING"
    assert Settings.load(toml_file, log_level="Error").log_level == "ERROR"
    assert "log_level" in _error(log_level="loud")


def test_sampler_ratio_setting(toml_file, monkeypatch):
    assert Settings.load().telemetry.sample_ratio == 0.1
    monkeypatch.setenv("KVTIER_TELEMETRY__SAMPLE_RATIO", "1")
    assert Settings.load().telemetry.sample_ratio == 1.0
    monkeypatch.setenv("KVTIER_TELEMETRY__SAMPLE_RATIO", "2")
    assert "telemetry.sample_ratio" in _error()


def test_startup_hint_names_the_real_setting(data_dir, caplog):
    import logging

    import torch

    from kvtier.tiering import TieredStore

    if torch.cuda.is_available():
        pytest.skip("the hint is for hosts without CUDA")
    with caplog.at_level(logging.INFO):
        with TieredStore(StoreSettings(data_dir=data_dir, hot_device="auto").to_store_config()):
            pass
    hint = [r.getMessage() for r in caplog.records if "hot tier off" in r.getMessage()]
    assert hint and "store.hot_device" in hint[0] and "--hot-device" in hint[0] and "hot.device" not in hint[0]
