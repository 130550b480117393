"""``gapcast edge check --connect`` against Mosquitto running the production config (TLS, password file, ACL): each
failure is named plainly (refused, tls, auth, protocol, acl), and a good config passes every step."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from support.small_agent import small_config

from gapcast.edge.brokercheck import check_broker
from gapcast.tools.localbroker import free_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

_SEC = Path(__file__).resolve().parents[1] / "deploy" / "test_mosquitto_security.py"
_spec = importlib.util.spec_from_file_location("_mosquitto_security_helpers", _SEC)
sec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sec)


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    work = tmp_path_factory.mktemp("check-broker")
    pki = sec.make_pki(work / "pki")
    passwd = sec.make_password_file(work / "passwd", sec.USERS)
    acl = work / "acl"
    shutil.copy(sec.DEPLOY / "acl.example", acl)
    broker = sec.ProductionBroker(work / "run", pki, passwd, acl)
    broker.workdir.mkdir()
    broker.start()
    try:
        yield broker, pki
    finally:
        broker.close()


def _cfg(tmp_path, broker, *, gateway="gw-01", user="gw-01", password=None, tls=None, version="5", port=None):
    mqtt = {"username": user, "password": password or sec.USERS.get(user, "x"), "version": version}
    if tls is not False:
        mqtt["tls"] = {"enabled": True, **(tls or {})}
    cfg = small_config(broker.host, port or broker.port, tmp_path, mqtt=mqtt, gateway={"id": gateway})
    return cfg


def _kinds(res):
    return [(s.name, s.ok, s.kind) for s in res.steps]


def test_good_config_passes_every_step(secure, tmp_path):
    broker, pki = secure
    for version in ("5", "3.1.1"):
        res = check_broker(_cfg(tmp_path, broker, tls={"ca_file": str(pki["ca"])}, version=version), timeout_s=5)
        assert _kinds(res) == [("tcp", True, ""), ("tls", True, ""), ("connect", True, ""), ("subscribe", True, ""),
                               ("publish", True, "")], res.steps  # fmt: skip
        assert "certificate and host name verified" in res.steps[1].detail
        assert res.steps[-1].detail == "gapcast/v1/gateways/gw-01/status acknowledged and read back"


def test_nothing_listening_is_refused(tmp_path, secure):
    broker, _ = secure
    res = check_broker(_cfg(tmp_path, broker, tls=False, port=free_port()), timeout_s=3)
    assert _kinds(res) == [("tcp", False, "refused")] and "nothing listens there" in res.failure.detail


def test_untrusted_certificate_is_a_tls_failure(secure, tmp_path):
    broker, pki = secure
    res = check_broker(_cfg(tmp_path, broker, tls={"ca_file": str(pki["rogue_ca"])}), timeout_s=5)
    assert _kinds(res) == [("tcp", True, ""), ("tls", False, "tls")]
    assert "does not verify" in res.failure.detail and "rogue-ca.crt" in res.failure.detail


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_bad_password_is_an_auth_failure(secure, tmp_path, version):
    broker, pki = secure
    res = check_broker(_cfg(tmp_path, broker, password="wrong", tls={"ca_file": str(pki["ca"])}, version=version), timeout_s=5)
    assert _kinds(res)[-1] == ("connect", False, "auth")
    assert "refused user 'gw-01'" in res.failure.detail
    assert ("bad user name or password" in res.failure.detail) or ("not authorised" in res.failure.detail)


def test_plain_mqtt_to_a_tls_port_is_a_protocol_failure(secure, tmp_path):
    broker, _ = secure
    res = check_broker(_cfg(tmp_path, broker, tls=False), timeout_s=2)
    assert _kinds(res)[-1] == ("connect", False, "protocol") and "TLS-only listener" in res.failure.detail


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_publishing_another_gateways_status_is_acl_denied(secure, tmp_path, version):
    broker, pki = secure
    # gw-01's credentials with gateway.id = gw-02: the ACL lets gw-01 write only gapcast/v1/gateways/gw-01/#.
    res = check_broker(_cfg(tmp_path, broker, gateway="gw-02", tls={"ca_file": str(pki["ca"])}, version=version), timeout_s=5)
    assert _kinds(res)[-1] == ("publish", False, "acl"), res.steps
    assert "gapcast/v1/gateways/gw-02/status" in res.failure.detail and "ACL denied" in res.failure.detail


def test_cli_prints_each_step_and_exits_1_on_failure(secure, tmp_path, tiny_bundle, signing_key, capsys):
    from gapcast.cli import main

    broker, pki = secure

    def write(password):
        p = tmp_path / "edge.toml"
        p.write_text(
            f"""[gateway]
id = "gw-01"
[mqtt]
host = "{broker.host}"
port = {broker.port}
username = "gw-01"
password_file = "pw"
[mqtt.tls]
enabled = true
ca_file = "{pki['ca']}"
[stations]
names = ["Aotizhongxin"]
[model]
bundle = "{tiny_bundle}"
trusted_keys = ["{signing_key.public}"]
backend = "interpolation"
[agent]
state_dir = "{tmp_path / 'state'}"
"""
        )
        (tmp_path / "pw").write_text(password + "\n")
        return p

    assert main(["edge", "check", "--config", str(write(sec.USERS["gw-01"])), "--connect", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert "connect publish: OK: gapcast/v1/gateways/gw-01/status acknowledged and read back" in out
    assert out.rstrip().endswith("broker: OK")
    assert main(["edge", "check", "--config", str(write("nope")), "--connect", "--timeout", "5"]) == 1
    out = capsys.readouterr().out
    assert "connect connect: FAILED (auth): the broker refused user 'gw-01'" in out
    assert "broker check failed (auth)" in out


def test_fleet_and_replay_take_the_password_from_a_file_or_the_environment(secure, tmp_path, monkeypatch, capsys):
    """Against the password-protected broker: `gapcast fleet status` with --password-file, `gapcast replay` with
    $GAPCAST_MQTT_PASSWORD; neither URL holds a password."""
    from gapcast.cli import main

    broker, pki = secure
    pw = tmp_path / "cloud.pw"
    pw.write_text(sec.USERS["gapcast-cloud"] + "\n")
    url = f"mqtts://gapcast-cloud@{broker.host}:{broker.port}"
    common = ["--fleet", "fleet-a", "--broker", url, "--ca-file", str(pki["ca"]), "--timeout", "5"]
    assert main(["fleet", "status", *common, "--password-file", str(pw), "--json"]) == 0
    assert capsys.readouterr().out.strip().startswith("[")
    assert main(["fleet", "status", *common, "--json"]) == 1  # no password anywhere: the broker refuses
    assert "failed" in capsys.readouterr().err

    monkeypatch.setenv("GAPCAST_MQTT_PASSWORD", sec.USERS["Dingling"])
    rc = main(["replay", "--broker", f"mqtts://Dingling@{broker.host}:{broker.port}", "--ca-file", str(pki["ca"]),
               "--stations", "Dingling", "--start", "2016-06-01T00:00:00Z", "--days", "0.25", "--speed", "0",
               "--no-progress"])  # fmt: skip
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0 and "6 acknowledged" in out.replace(",", ""), (out, cap.err)
