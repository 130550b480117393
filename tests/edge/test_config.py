"""edge.toml: defaults, validation messages that name the key, the example file, `gapcast edge check`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gapcast.cli import main as gapcast_main
from gapcast.edge import ConfigError
from gapcast.edge.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "edge.example.toml"
MIN = {"gateway": {"id": "gw-01"}, "stations": {"names": ["A", "B"]}, "model": {"bundle": "b", "trusted_keys": ["k.pub"]}}


def cfg_with(**sections):
    d = {k: dict(v) for k, v in MIN.items()}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return d


def test_minimal_config_gets_the_documented_defaults(tmp_path):
    cfg = parse_config(cfg_with(), base=tmp_path)
    assert cfg.gateway_id == "gw-01" and cfg.client_id == "gapcast-gw-01" and cfg.topic_prefix == "gapcast/v1"
    b = cfg.broker
    assert (b.host, b.port, b.mqtt_version, b.keepalive_s, b.session_expiry_s) == ("127.0.0.1", 1883, "5", 30, 604800)
    assert not b.tls.enabled and not b.tls.insecure
    assert cfg.stations.names == ("A", "B") and not cfg.stations.auto_register
    assert cfg.model.bundle == tmp_path / "b" and cfg.model.trusted_keys == (str(tmp_path / "k.pub"),)
    assert cfg.input.sentinels == (-200.0, -9999.0) and cfg.input.lateness_s == 300.0
    assert cfg.agent.clock == "gateway" and cfg.agent.max_missing_share == 0.5
    assert cfg.agent.state_dir == tmp_path / "state" and cfg.outbox.kind == "sqlite"
    # TLS on: the default port becomes 8883.
    assert parse_config(cfg_with(mqtt={"tls": {"enabled": True}}), base=tmp_path).broker.port == 8883


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"mqtt": {"port": "1883"}}, "mqtt.port: must be an integer"),
        ({"mqtt": {"port": 70000}}, "mqtt.port: must be in 1..65535"),
        ({"mqtt": {"version": "4"}}, "mqtt.version: must be one of 5, 3.1.1"),
        ({"mqtt": {"prot": 1}}, "unknown key(s) in [mqtt]: mqtt.prot"),
        ({"mqtt": {"password": "x"}}, "mqtt.password: given without mqtt.username"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix"),
        ({"mqtt": {"reconnect_min_s": 10, "reconnect_max_s": 5}}, "mqtt.reconnect_max_s"),
        ({"mqtt": {"tls": {"tls_insecure": True}}}, "mqtt.tls.enabled is false"),
        ({"mqtt": {"tls": {"enabled": True, "cert_file": "c.pem"}}}, "give both"),
        ({"mqtt": {"tls": {"enabled": True, "ca_file": "nope.pem"}}}, "mqtt.tls.ca_file"),
        ({"gateway": {"id": "gw 01"}}, "gateway.id"),
        ({"stations": {"names": ["A", "A"]}}, "stations.names: holds duplicates"),
        ({"stations": {"names": [1]}}, "stations.names: must be a list of strs"),
        ({"stations": {"names": ["A", "B"], "max_stations": 1}}, "stations.max_stations"),
        ({"model": {"backend": "cuda"}}, "model.backend: must be one of"),
        ({"model": {"trusted_keys": []}}, "model.trusted_keys: required"),
        ({"input": {"sentinels": ["-200"]}}, "input.sentinels"),
        ({"input": {"lateness_s": -1}}, "input.lateness_s"),
        ({"input": {"unknown_channels": "drop"}}, "input.unknown_channels"),
        ({"agent": {"max_missing_share": 1.5}}, "agent.max_missing_share"),
        ({"agent": {"clock": "wall"}}, "agent.clock"),
        ({"outbox": {"kind": "redis"}}, "outbox.kind"),
        ({"extra": {}}, "unknown key(s) in the top level: extra"),
    ],
)
def test_errors_name_the_key(tmp_path, sections, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg_with(**sections), base=tmp_path)
    assert message in str(exc.value)


def test_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="gateway.id: required"):
        parse_config({"stations": {"names": ["A"]}}, base=tmp_path)
    with pytest.raises(ConfigError, match="stations: list stations.names or set stations.auto_register"):
        parse_config({"gateway": {"id": "g"}}, base=tmp_path)


def test_tls_insecure_is_explicit_and_logged(tmp_path, caplog):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "pw").write_text("s3cret\n")
    with caplog.at_level(logging.WARNING, logger="gapcast.edge.config"):
        cfg = parse_config(
            cfg_with(mqtt={"username": "u", "password_file": "pw",
                           "tls": {"enabled": True, "ca_file": "ca.pem", "tls_insecure": True}}),
            base=tmp_path,
        )
    assert cfg.broker.tls.insecure and cfg.broker.tls.ca_file == tmp_path / "ca.pem"
    assert cfg.broker.password == "s3cret" and "s3cret" not in repr(cfg.broker)
    assert any("NOT verified" in r.getMessage() for r in caplog.records)


def test_example_file_parses_and_documents_every_option():
    cfg = load_config(EXAMPLE)
    assert cfg.gateway_id == "gw-01" and cfg.stations.names == ("Aotizhongxin", "Dongsi")
    assert (cfg.input.unknown_channels, cfg.input.topic, cfg.input.aliases) == (
        "ignore", "{prefix}/stations/{station}/readings", {})
    text = EXAMPLE.read_text()
    for table in ("[input.aliases]", "[input.scale]", "[input.channel_aggregate]"):
        assert table in text, table
    for key in ("host", "port", "version", "client_id", "keepalive_s", "session_expiry_s", "topic_prefix", "username",
                "password", "password_file", "reconnect_min_s", "reconnect_max_s", "max_inflight", "enabled",
                "ca_file", "cert_file", "key_file", "tls_insecure", "names", "auto_register", "max_stations",
                "bundle", "trusted_keys", "backend", "threads", "max_batch", "lateness_s", "max_future_s",
                "sentinels", "max_payload_bytes", "max_json_depth", "unknown_channels", "clock",
                "max_missing_share", "tick_interval_s", "status_interval_s", "state_dir", "snapshot_interval_s",
                "kind", "max_bytes", "max_age_s", "drop_order", "synchronous", "rate_per_s", "burst", "fleet",
                "health_steps", "max_artifact_bytes", "max_attempts", "range_slack", "topic", "epoch", "max_keys",
                "aggregate", "pm25", "RAIN"):
        assert f"{key} =" in text, key


def test_check_says_clearly_that_the_bundle_is_missing(capsys):
    rc = gapcast_main(["edge", "check", "--config", str(EXAMPLE)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "model.bundle: /var/lib/gapcast/bundles/current does not exist" in err


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_check_prints_what_the_agent_would_do(tmp_path, tiny_bundle, signing_key, capsys):
    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-01"\n[stations]\nnames = ["Aotizhongxin"]\n'
        f'[model]\nbundle = "{tiny_bundle}"\ntrusted_keys = ["{signing_key.public}"]\nbackend = "onnxruntime"\n'
    )
    assert gapcast_main(["edge", "check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "signature and" in out and "model confill v1: 13 channels" in out and "lookback 96, horizon 24" in out
    assert "backend: onnxruntime" in out and "subscribe: gapcast/v1/stations/+/readings (QoS 1)" in out
    assert "gapcast/v1/gateways/gw-01/status (retained" in out
    # A bundle signed by a key the gateway does not trust is refused.
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace(str(signing_key.public), "ab" * 32))
    assert gapcast_main(["edge", "check", "--config", str(other)]) == 1
    assert "does not verify" in capsys.readouterr().err


def test_a_non_utf8_config_is_a_config_error_naming_the_file(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[gateway]\nid = \"gw\xff\xfe\"\n")
    with pytest.raises(ConfigError, match=r"binary\.toml is not UTF-8 text \(byte 18: invalid start byte\)"):
        load_config(binary)
    assert gapcast_main(["edge", "check", "--config", str(binary)]) == 1


def test_state_dir_that_is_a_file_is_rejected(tmp_path):
    f = tmp_path / "state"
    f.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"agent\.state_dir: {f} exists and is not a directory"):
        parse_config(cfg_with(agent={"state_dir": "state"}), base=tmp_path)
    (tmp_path / "ok").mkdir()
    assert parse_config(cfg_with(agent={"state_dir": "ok"}), base=tmp_path).agent.state_dir == tmp_path / "ok"


@pytest.mark.parametrize(
    ("section", "why"),
    [
        ({"mqtt": {"host": ""}}, "mqtt.host: must not be empty"),
        ({"mqtt": {"host": "  "}}, "mqtt.host: must not be empty"),
        ({"mqtt": {"topic_prefix": ""}}, "mqtt.topic_prefix: must not be empty"),
        ({"mqtt": {"topic_prefix": "site/+/gapcast"}}, "must not start/end with '/' nor hold + #"),
        ({"mqtt": {"topic_prefix": "gapcast/#"}}, "must not start/end with '/' nor hold + #"),
        ({"mqtt": {"topic_prefix": "/gapcast"}}, "must not start/end with '/'"),
        ({"mqtt": {"topic_prefix": "gapcast/"}}, "must not start/end with '/'"),
        ({"outbox": {"drop_order": ["forecast", "filled"]}}, "must not hold 'filled' or 'revision'"),
        ({"outbox": {"drop_order": ["revision"]}}, "must not hold 'filled' or 'revision'"),
        ({"outbox": {"drop_order": ["forcast"]}}, "unknown kind(s) ['forcast']"),
        ({"outbox": {"drop_order": ["status", "status"]}}, "outbox.drop_order: holds duplicates"),
    ],
)
def test_values_that_used_to_be_accepted_are_rejected(section, why):
    with pytest.raises(ConfigError) as err:
        parse_config(cfg_with(**section))
    assert why in str(err.value)


def test_valid_prefix_and_drop_order_are_kept():
    cfg = parse_config(cfg_with(mqtt={"topic_prefix": "site-3/gapcast", "host": "broker.lan"},
                                outbox={"drop_order": ["status", "forecast"]}))
    assert (cfg.topic_prefix, cfg.broker.host, cfg.outbox.drop_order) == (
        "site-3/gapcast", "broker.lan", ("status", "forecast"))


def test_preferred_backend_warning_says_why():
    from types import SimpleNamespace

    from gapcast.edge.cli import preferred_backend_warning

    ort = SimpleNamespace(name="onnxruntime", selection=[("tensorrt", "TensorRT is not installed")])
    assert preferred_backend_warning("tensorrt", ort) == (
        "preferred backend tensorrt is unavailable (TensorRT is not installed); running on onnxruntime instead"
    )
    assert preferred_backend_warning("auto", ort) is None
    assert preferred_backend_warning("onnxruntime", ort) is None


def test_check_warns_when_tensorrt_is_preferred_but_unavailable(tmp_path, tiny_bundle, signing_key, capsys,
                                                                monkeypatch):
    from gapcast.edge import BackendError, trt

    def no_trt(*a, **k):
        raise BackendError("TensorRT is not installed (import tensorrt failed)")

    monkeypatch.setattr(trt, "load_cached_engine", no_trt)
    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        f'[gateway]\nid = "gw-01"\n[stations]\nnames = ["Aotizhongxin"]\n'
        f'[model]\nbundle = "{tiny_bundle}"\ntrusted_keys = ["{signing_key.public}"]\nbackend = "tensorrt"\n'
        f'threads = 1\n'
    )
    assert gapcast_main(["edge", "check", "--config", str(cfg)]) == 0  # a warning, not a failure
    out = capsys.readouterr().out
    assert "backend: onnxruntime (preferred: tensorrt)" in out
    assert ("WARNING: preferred backend tensorrt is unavailable (TensorRT is not installed (import tensorrt failed)); "
            "running on onnxruntime instead") in out
