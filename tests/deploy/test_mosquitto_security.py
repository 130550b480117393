"""The production broker config (deploy/mosquitto/) really enforces TLS, password authentication and the ACL.

Mosquitto is started with deploy/mosquitto/mosquitto.conf itself, only its port and file paths swapped for
temporary ones, and deploy/mosquitto/acl.example as the ACL. A test CA, the broker's certificate and a rogue CA are
made here with the ``cryptography`` library; the password file with ``mosquitto_passwd`` (or, where that tool is
missing, the same PBKDF2-SHA512 ``$7$`` format written directly, checked against the tool when both exist).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gapcast.tools.localbroker import LocalBroker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
USERS = {"gw-01": "pw-gw-01", "gw-02": "pw-gw-02", "gapcast-cloud": "pw-cloud", "Dingling": "pw-dingling"}


# -- certificates ----------------------------------------------------------------------------------------------------


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_cn, subject_key, issuer_cn, issuer_key, *, ca: bool, san_ip: str | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(issuer_cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    if san_ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip)), x509.DNSName("localhost")]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, cert=None, key=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
    return path


def make_pki(folder: Path) -> dict[str, Path]:
    """A test CA, the broker's certificate (SAN 127.0.0.1 + localhost) signed by it, and an unrelated rogue CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_key, server_key = _key(), _key(), _key()
    ca = _cert("gapcast test CA", ca_key, "gapcast test CA", ca_key, ca=True)
    rogue = _cert("rogue CA", rogue_key, "rogue CA", rogue_key, ca=True)
    server = _cert("127.0.0.1", server_key, "gapcast test CA", ca_key, ca=False, san_ip="127.0.0.1")
    return {
        "ca": _write_pem(folder / "ca.crt", cert=ca),
        "rogue_ca": _write_pem(folder / "rogue-ca.crt", cert=rogue),
        "server_cert": _write_pem(folder / "server.crt", cert=server),
        "server_key": _write_pem(folder / "server.key", key=server_key),
    }


# -- password file -------------------------------------------------------------------------------------------------


def _hash_line(user: str, password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2.x password line: ``user:$7$ITER$b64(salt)$b64(PBKDF2-HMAC-SHA512)``."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    tool = shutil.which("mosquitto_passwd")
    if tool:
        path.write_text("")
        for u, p in users.items():
            subprocess.run([tool, "-b", str(path), u, p], check=True, capture_output=True)
    else:
        path.write_text("".join(_hash_line(u, p) + "\n" for u, p in users.items()))
    path.chmod(0o600)
    return path


@pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed (the fallback writer is used instead)"
)
def test_password_line_format_matches_mosquitto_passwd(tmp_path):
    """The fallback writer above produces exactly what mosquitto_passwd writes (same salt, same hash)."""
    tool = shutil.which("mosquitto_passwd")
    p = tmp_path / "pw"
    p.write_text("")
    subprocess.run([tool, "-b", str(p), "alice", "s3cret"], check=True, capture_output=True)
    line = p.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert _hash_line("alice", "s3cret", salt=salt) == line


# -- the broker with the production config ------------------------------------------------------------------------


def adapt_config(text: str, *, port: int, workdir: Path, pki: dict[str, Path], passwd: Path, acl: Path) -> str:
    """deploy/mosquitto/mosquitto.conf with its port and paths swapped for test ones; every other line verbatim."""
    swaps = {
        r"listener 8883": f"listener {port} 127.0.0.1",
        r"password_file \S+": f"password_file {passwd}",
        r"acl_file \S+": f"acl_file {acl}",
        r"cafile \S+": f"cafile {pki['ca']}",
        r"certfile \S+": f"certfile {pki['server_cert']}",
        r"keyfile \S+": f"keyfile {pki['server_key']}",
        r"persistence_location \S+": f"persistence_location {workdir}/",
        r"log_dest syslog": f"log_dest file {workdir / 'mosquitto.log'}",
    }
    out, seen = [], set()
    for line in text.splitlines():
        for pat, repl in swaps.items():
            if re.fullmatch(pat, line.strip()):
                line = repl
                seen.add(pat)
        out.append(line)
    missing = set(swaps) - seen
    assert not missing, f"deploy config lost expected settings: {missing}"
    if os.geteuid() == 0:
        out.append("user root")  # see LocalBroker: the dropped-privilege user cannot read a 0700 temp folder
    return "\n".join(out) + "\n"


class ProductionBroker(LocalBroker):
    """LocalBroker running the adapted production config instead of its generated one."""

    def __init__(self, workdir: Path, pki: dict[str, Path], passwd: Path, acl: Path) -> None:
        super().__init__(workdir=workdir)
        self._text = adapt_config(
            (DEPLOY / "mosquitto.conf").read_text(), port=self.port, workdir=workdir, pki=pki, passwd=passwd, acl=acl
        )

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._text)
        return conf


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure-broker")
    pki = make_pki(work / "pki")
    passwd = make_password_file(work / "passwd", USERS)
    acl = work / "acl"
    shutil.copy(DEPLOY / "acl.example", acl)
    broker = ProductionBroker(work / "run", pki, passwd, acl)
    broker.workdir.mkdir()
    broker.start()
    try:
        yield broker, pki
    finally:
        broker.close()


# -- a small synchronous MQTT 5 client -----------------------------------------------------------------------------


class Client:
    """paho client that records CONNACK, SUBACK, PUBACK reason codes and received messages (network thread)."""

    def __init__(self, broker, ca: Path | None, user: str | None, password: str | None, cid: str) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        if ca is not None:
            self.c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.connack = threading.Event()
        self.reason = None
        self.suback: dict[int, list] = {}
        self.puback: dict[int, int] = {}
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.suback.__setitem__(mid, [int(r.value) for r in rcs])
        self.c.on_publish = lambda c, u, mid, rc, props: self.puback.__setitem__(mid, int(rc.value))
        self.c.on_message = self._on_message
        self.broker = broker

    def _on_connect(self, c, u, flags, reason, props):
        self.reason = reason
        self.connack.set()

    def _on_message(self, c, u, msg):
        with self.lock:
            self.got.append((msg.topic, msg.payload))

    def connect(self, timeout_s: float = 10.0):
        """Connect; returns the CONNACK reason code's value, or raises the TLS/socket error."""
        self.c.reconnect_delay_set(60, 60)
        self.c.connect(self.broker.host, self.broker.port, keepalive=30)
        self.c.loop_start()
        if not self.connack.wait(timeout_s):
            # paho closes the socket on a refused CONNACK before the callback when the broker drops the TCP link.
            return None
        return int(self.reason.value)

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.c.subscribe(topic, qos=1)
        _wait(lambda: mid in self.suback)
        return self.suback[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.c.publish(topic, payload, qos=1)
        _wait(lambda: info.mid in self.puback)
        return self.puback[info.mid]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def _wait(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


NOT_AUTHORIZED = 0x87
SUCCESS = 0


def test_production_config_starts_with_tls_auth_acl(secure):
    broker, _ = secure
    text = (broker.workdir / "mosquitto.conf").read_text()
    for must in ("allow_anonymous false", "require_certificate false", "tls_version tlsv1.2", "persistence true"):
        assert must in text
    assert broker.proc is not None and broker.proc.poll() is None


def test_gateway_cannot_publish_to_another_gateways_topics(secure):
    broker, pki = secure
    cloud = Client(broker, pki["ca"], "gapcast-cloud", USERS["gapcast-cloud"], "cloud-observer")
    gw1 = Client(broker, pki["ca"], "gw-01", USERS["gw-01"], "gapcast-gw-01")
    assert cloud.connect() == SUCCESS and gw1.connect() == SUCCESS
    try:
        assert cloud.subscribe("gapcast/v1/#") == [1]  # the cloud may read everything gapcast publishes
        forbidden = [
            "gapcast/v1/gateways/gw-02/status",  # impersonate another gateway's status
            "gapcast/v1/deadletter/gw-02",
            "gapcast/v1/stations/Dingling/filled",  # gw-02's station
            "gapcast/v1/stations/Dingling/forecast",
            "gapcast/v1/stations/Aotizhongxin/readings",  # forge its own station's input
            "gapcast/v1/fleet/fleet-a/release",  # forge a model release
        ]
        allowed = [
            "gapcast/v1/gateways/gw-01/status",
            "gapcast/v1/deadletter/gw-01",
            "gapcast/v1/stations/Aotizhongxin/filled",
            "gapcast/v1/stations/Changping/forecast",
        ]
        # MQTT 5: the broker answers a denied QoS 1 PUBLISH with PUBACK reason 0x87 Not authorized.
        assert [gw1.publish(t, b"forbidden") for t in forbidden] == [NOT_AUTHORIZED] * len(forbidden)
        assert [gw1.publish(t, b"ok") for t in allowed] == [SUCCESS] * len(allowed)
        # One client's messages are forwarded in order: a forbidden one wrongly let through would stand before the
        # allowed ones, so once as many as were allowed have arrived the list must be exactly those.
        _wait(lambda: len(cloud.got) >= len(allowed))
        with cloud.lock:
            assert [t for t, _ in cloud.got] == allowed
            assert all(p == b"ok" for _, p in cloud.got)
    finally:
        cloud.close()
        gw1.close()


def test_gateway_reads_only_its_fleet_and_stations(secure):
    broker, pki = secure
    cloud = Client(broker, pki["ca"], "gapcast-cloud", USERS["gapcast-cloud"], "cloud-publisher")
    gw1 = Client(broker, pki["ca"], "gw-01", USERS["gw-01"], "gapcast-gw-01-reader")
    dingling = Client(broker, pki["ca"], "Dingling", USERS["Dingling"], "logger-dingling")
    assert cloud.connect() == SUCCESS and gw1.connect() == SUCCESS and dingling.connect() == SUCCESS
    try:
        # Mosquitto 2.0 may grant a SUBSCRIBE (0x01) or refuse it (0x87) depending on the version; either way it
        # delivers only what the ACL lets gw-01 read, which is what matters and what is checked below.
        assert gw1.subscribe("gapcast/v1/fleet/fleet-b/#")[0] in (1, NOT_AUTHORIZED)
        assert gw1.subscribe("gapcast/v1/fleet/fleet-a/#") == [1]
        gw1.subscribe("gapcast/v1/#")
        assert cloud.publish("gapcast/v1/fleet/fleet-b/release", b"b") == SUCCESS
        # A station logger may publish only its own readings.
        assert dingling.publish("gapcast/v1/stations/Aotizhongxin/readings", b"x") == NOT_AUTHORIZED
        assert dingling.publish("gapcast/v1/stations/Dingling/readings", b"d") == SUCCESS
        assert cloud.publish("gapcast/v1/fleet/fleet-a/release", b"a") == SUCCESS
        # A last allowed message marks the end: the broker routed every earlier publish (each was acked) before it,
        # and delivers to gw-01 in order on one connection, so once it is in, anything wrongly let through is too.
        assert cloud.publish("gapcast/v1/fleet/fleet-a/release", b"end") == SUCCESS
        _wait(lambda: any(p == b"end" for _, p in gw1.got))
        with gw1.lock:
            got = list(gw1.got)
        # gw-01's two overlapping subscriptions may each deliver a copy; what matters is which topics and payloads.
        assert {t for t, _ in got} == {"gapcast/v1/fleet/fleet-a/release"}
        assert list(dict.fromkeys(p for _, p in got)) == [b"a", b"end"]
    finally:
        for c in (cloud, gw1, dingling):
            c.close()


@pytest.mark.parametrize(
    ("user", "password"), [(None, None), ("gw-01", "wrong password"), ("nobody", "pw-gw-01")], ids=["anonymous", "bad-password", "unknown-user"]
)
def test_unauthenticated_client_is_refused(secure, user, password):
    broker, pki = secure
    c = Client(broker, pki["ca"], user, password, f"intruder-{user}")
    try:
        rc = c.connect(timeout_s=5)
        # 0x86 Bad user name or password, 0x87 Not authorized (MQTT 5 CONNACK reason codes).
        assert rc in (0x86, 0x87)
        assert not c.c.is_connected()
    finally:
        c.c.loop_stop()


def test_client_that_does_not_trust_the_ca_fails(secure):
    broker, pki = secure
    c = Client(broker, pki["rogue_ca"], "gw-01", USERS["gw-01"], "gapcast-gw-01-rogue")
    with pytest.raises(ssl.SSLCertVerificationError):
        c.c.connect(broker.host, broker.port, keepalive=30)


def test_plain_tcp_client_gets_no_session(secure):
    """No plain-text listener: an MQTT client without TLS never gets a CONNACK (credentials would go in clear)."""
    broker, _ = secure
    c = Client(broker, None, "gw-01", USERS["gw-01"], "gapcast-gw-01-plain")
    try:
        assert c.connect(timeout_s=3) is None
    except (ConnectionError, OSError):
        pass
    finally:
        c.c.loop_stop()
    assert not c.connack.is_set()


# -- the agent's own TLS: verification on by default, off only explicitly and logged ----------------------------


def _agent(broker, tls: dict, tmp_path: Path):
    """The real MQTT shell (gapcast.edge.mqtt.MqttAgent) configured for the secure broker as gateway gw-01."""
    from gapcast.edge.agent import AgentCore, CoreSettings
    from gapcast.edge.bundle import Card
    from gapcast.edge.config import parse_config
    from gapcast.edge.messages import Topics
    from gapcast.edge.mqtt import MqttAgent
    from gapcast.edge.outbox_memory import MemoryOutbox

    cfg = parse_config(
        {
            "gateway": {"id": "gw-01"},
            "mqtt": {"host": broker.host, "port": broker.port, "username": "gw-01", "password": USERS["gw-01"],
                     "reconnect_min_s": 1, "reconnect_max_s": 1, "tls": {"enabled": True, **tls}},
            "stations": {"names": ["Aotizhongxin"]},
            "agent": {"state_dir": str(tmp_path)},
        },
        base=tmp_path,
    )
    card = Card.from_dict(
        {
            "schema_version": 1, "model": {"name": "confill", "version": 1}, "created": "2026-11-29T00:00:00Z",
            "channels": [{"name": "PM2.5", "unit": "ug/m3", "valid_min": 0, "valid_max": 2000, "mean": 80, "std": 80}],
            "cadence_s": 3600, "lookback": 4, "horizon": 2,
            "calendar": {"features": [], "utc_offset_s": 0}, "inputs": [], "outputs": [],
            "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 1}},
            "variants": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
        }
    )
    core = AgentCore(card, Topics(cfg.topic_prefix, cfg.gateway_id), CoreSettings.from_config(cfg))
    return MqttAgent(cfg, core, MemoryOutbox(), snapshot_path="")


@pytest.mark.parametrize(
    ("tls", "connects"),
    [
        ({"ca_file": "CA"}, True),  # the fleet's CA: certificate and host name verified
        ({"ca_file": "ROGUE"}, False),  # a broker whose certificate the gateway does not trust
        ({}, False),  # no ca_file: the system trust store, which does not hold the test CA
        ({"ca_file": "ROGUE", "tls_insecure": True}, True),  # verification explicitly off (and logged)
    ],
    ids=["trusted-ca", "untrusted-ca", "system-store", "insecure-explicit"],
)
def test_agent_verifies_the_broker_certificate_by_default(secure, tmp_path, caplog, tls, connects):
    broker, pki = secure
    tls = {k: (str(pki["ca"]) if v == "CA" else str(pki["rogue_ca"]) if v == "ROGUE" else v) for k, v in tls.items()}
    agent = _agent(broker, tls, tmp_path)
    try:
        agent.start()
        assert agent.connected.wait(5 if connects else 3) is connects
    finally:
        agent.client.disconnect()
        agent.client.loop_stop()
    warned = "TLS verification of the broker" in caplog.text and "tls_insecure" in caplog.text
    assert warned is bool(tls.get("tls_insecure"))
