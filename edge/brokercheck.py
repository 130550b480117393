"""``gapcast edge check --connect``: try the broker the way the agent will, and say plainly what fails.

The steps, each stopping the check when it fails (the failure kinds in brackets):

1. TCP to ``mqtt.host:mqtt.port`` [``dns``: the name does not resolve; ``refused``: nothing listens there;
   ``unreachable``: no answer, a firewall or a wrong address];
2. the TLS handshake with the configured CA, client certificate and verification, when ``mqtt.tls.enabled``
   [``tls``: the certificate does not verify, the host name does not match, the handshake fails];
3. MQTT CONNECT with the configured version, user name and password [``auth``: bad user name or password, not
   authorised; ``protocol``: no CONNACK, e.g. a TLS-only port spoken to without TLS];
4. SUBSCRIBE to the readings filter with QoS 1 [``acl``: the broker refuses it];
5. PUBLISH a status message (``state: offline``, reason "connection check", NOT retained, so a running agent's
   retained status stays) and read it back on the status topic [``acl``: the PUBACK refuses it (MQTT 5), or it never
   comes back (MQTT 3.1.1, where a broker drops a denied publish silently)].

The check connects with the client id ``{mqtt client id}-check``, so it does not take over a running agent's
persistent session.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gapcast.edge.config import EdgeConfig
from gapcast.edge.messages import Topics, offline_payload

__all__ = ["BrokerCheck", "CheckStep", "check_broker"]


@dataclass(frozen=True)
class CheckStep:
    """One step of the check.

    Attributes:
        name: ``tcp``, ``tls``, ``connect``, ``subscribe``, ``publish``.
        ok: it passed.
        detail: what happened, in a sentence.
        kind: the failure kind (``dns``, ``refused``, ``unreachable``, ``tls``, ``auth``, ``protocol``, ``acl``),
            ``warning`` for a pass with a caveat, or "" when it passed.
    """

    name: str
    ok: bool
    detail: str
    kind: str = ""


@dataclass
class BrokerCheck:
    """The steps run, in order; :attr:`ok` when every one passed."""

    steps: list[CheckStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def failure(self) -> CheckStep | None:
        return next((s for s in self.steps if not s.ok), None)

    def add(self, name: str, ok: bool, detail: str, kind: str = "") -> bool:
        self.steps.append(CheckStep(name, ok, detail, kind))
        return ok


def _tls_context(cfg: EdgeConfig) -> ssl.SSLContext:
    t = cfg.broker.tls
    ctx = ssl.create_default_context(cafile=str(t.ca_file) if t.ca_file else None)
    if t.cert_file:
        ctx.load_cert_chain(str(t.cert_file), str(t.key_file) if t.key_file else None)
    if t.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tcp_and_tls(cfg: EdgeConfig, res: BrokerCheck, timeout_s: float) -> bool:
    b = cfg.broker
    where = f"{b.host}:{b.port}"
    try:
        sock = socket.create_connection((b.host, b.port), timeout=timeout_s)
    except socket.gaierror as exc:
        return res.add("tcp", False, f"cannot resolve {b.host!r}: {exc.strerror or exc} (mqtt.host)", "dns")
    except ConnectionRefusedError:
        return res.add("tcp", False, f"connection to {where} refused: nothing listens there (broker down? mqtt.port?)", "refused")
    except TimeoutError:
        return res.add("tcp", False, f"no answer from {where} within {timeout_s:g} s (firewall? wrong mqtt.host?)", "unreachable")
    except OSError as exc:
        return res.add("tcp", False, f"cannot reach {where}: {exc}", "unreachable")
    with sock:
        res.add("tcp", True, f"{where} accepts TCP connections")
        if not b.tls.enabled:
            return True
        try:
            ctx = _tls_context(cfg)
            with ctx.wrap_socket(sock, server_hostname=b.host) as tls:
                version = tls.version()
        except ssl.SSLCertVerificationError as exc:
            ca = f"mqtt.tls.ca_file = {b.tls.ca_file}" if b.tls.ca_file else "the system trust store (no mqtt.tls.ca_file)"
            return res.add(
                "tls", False, f"the broker's certificate does not verify: {exc.verify_message} (trusted: {ca})", "tls"
            )
        except (ssl.SSLError, OSError) as exc:
            return res.add("tls", False, f"TLS handshake with {where} failed: {exc} (is it a TLS port?)", "tls")
    verified = "certificate NOT verified (tls_insecure)" if b.tls.insecure else "certificate and host name verified"
    return res.add("tls", True, f"{version}, {verified}")


# CONNACK reason codes: MQTT 5 (section 3.2.2.2) and the 3.1.1 return codes paho maps onto them.
_AUTH_CODES = {0x86: "bad user name or password", 0x87: "not authorised", 0x8C: "bad authentication method"}
_V311_CODES = {4: "bad user name or password", 5: "not authorised"}


class _Probe:
    """A paho client with the agent's connection settings that records what the broker answered (paho's network
    thread runs the callbacks; the caller waits on the events)."""

    def __init__(self, cfg: EdgeConfig) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        b = cfg.broker
        self.v5 = b.mqtt_version == "5"
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{cfg.client_id}-check",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        if b.username:
            self.c.username_pw_set(b.username, b.password)
        if b.tls.enabled:
            self.c.tls_set_context(_tls_context(cfg))
            if b.tls.insecure:
                self.c.tls_insecure_set(True)
        self.connack = threading.Event()
        self.reason: Any = None
        self.disconnect_reason: Any = None
        self.suback: dict[int, list] = {}
        self.puback: dict[int, Any] = {}
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.reason = reason_code
        self.connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_reason = reason_code

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self.lock:
            self.suback[mid] = list(reason_codes)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.lock:
            self.puback[mid] = reason_code

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _auth_reason(rc: Any, v5: bool) -> str | None:
    value = int(getattr(rc, "value", rc))
    if value in _AUTH_CODES:
        return _AUTH_CODES[value]
    if not v5 and value in _V311_CODES:
        return _V311_CODES[value]
    return None


def check_broker(cfg: EdgeConfig, timeout_s: float = 10.0) -> BrokerCheck:
    """Connect, subscribe and publish as the agent would; see the module docstring for the steps.

    Args:
        cfg: the gateway configuration (``[mqtt]`` with its TLS and credentials).
        timeout_s: how long each step waits for the broker, seconds.

    Returns:
        The :class:`BrokerCheck` (never raises for a broker problem: each is a failed step with its kind).
    """
    res = BrokerCheck()
    if not _tcp_and_tls(cfg, res, timeout_s):
        return res
    topics = Topics(cfg.topic_prefix, cfg.gateway_id)
    p = _Probe(cfg)
    try:
        if not _connect_step(cfg, p, res, timeout_s):
            return res
        readable = _subscribe_step(p, topics, res, timeout_s)
        if readable is None:
            return res
        _publish_step(cfg, p, topics, res, timeout_s, readable)
        return res
    finally:
        p.close()


def _connect_step(cfg: EdgeConfig, p: _Probe, res: BrokerCheck, timeout_s: float) -> bool:
    """Step "connect": open the MQTT session and wait for the CONNACK; adds the step to ``res``.

    Returns:
        Whether the session is up (else the failed step names its kind: ``tls``, ``refused``, ``auth`` or
        ``protocol``). Raises nothing for a broker problem.
    """
    b = cfg.broker
    user = f"user {b.username!r}" if b.username else "anonymous"
    try:
        p.c.connect(b.host, b.port, keepalive=max(b.keepalive_s, 10))
    except ssl.SSLError as exc:
        res.add("connect", False, f"TLS: {exc}", "tls")
        return False
    except OSError as exc:
        res.add("connect", False, f"cannot connect: {exc}", "refused")
        return False
    p.c.loop_start()
    if not p.connack.wait(timeout_s):
        why = _auth_reason(p.disconnect_reason, p.v5) if p.disconnect_reason is not None else None
        if why:
            res.add("connect", False, f"the broker refused {user}: {why}", "auth")
        else:
            hint = "" if b.tls.enabled else " (a TLS-only listener? mqtt.tls.enabled = false)"
            res.add("connect", False, f"no CONNACK within {timeout_s:g} s{hint}", "protocol")
        return False
    rc = p.reason
    if rc.is_failure:
        why = _auth_reason(rc, p.v5)
        if why:
            res.add("connect", False, f"the broker refused {user}: {why} (mqtt.username / mqtt.password)", "auth")
        else:
            res.add("connect", False, f"the broker refused the connection: {rc}", "protocol")
        return False
    res.add("connect", True, f"MQTT {b.mqtt_version} session as {user}, client id {cfg.client_id}-check")
    return True


def _subscribe_step(p: _Probe, topics: Topics, res: BrokerCheck, timeout_s: float) -> bool | None:
    """Step "subscribe": the readings filter (must be granted) and the gateway's own status topic.

    Returns:
        None when the step failed (added to ``res``: no SUBACK, ``protocol``; refused, ``acl``); else whether the
        status subscription was granted too (reading back our own publish needs it).
    """
    with p.lock:
        p.got.clear()
    ok = True
    for topic in (topics.readings_filter, topics.status):
        _, mid = p.c.subscribe(topic, qos=1)
        if not _wait(lambda m=mid: m in p.suback, timeout_s):
            res.add("subscribe", False, f"no SUBACK for {topic} within {timeout_s:g} s", "protocol")
            return None
        codes = p.suback[mid]
        failed = [c for c in codes if getattr(c, "is_failure", False) or int(getattr(c, "value", c)) >= 0x80]
        if topic == topics.readings_filter:
            if failed:
                res.add("subscribe", False, f"the broker refused the subscription to {topic} ({failed[0]}): ACL denied", "acl")
                return None
            res.add("subscribe", True, f"{topic} granted QoS {int(getattr(codes[0], 'value', codes[0]))}")
        elif failed:
            ok = False  # reading back our own status is only for the 3.1.1 echo check below
    return ok


def _publish_step(cfg: EdgeConfig, p: _Probe, topics: Topics, res: BrokerCheck, timeout_s: float,
                  readable: bool) -> None:
    """Step "publish": an offline status at QoS 1, its PUBACK, and (when ``readable``) reading it back, which on
    MQTT 3.1.1 is the only way to see a publish the broker's ACL dropped silently. Adds the step to ``res``."""
    info = p.c.publish(topics.status, offline_payload(cfg.gateway_id, "connection check", fleet=cfg.fleet), qos=1)
    if not _wait(lambda: info.mid in p.puback, timeout_s):
        res.add("publish", False, f"no PUBACK for {topics.status} within {timeout_s:g} s", "protocol")
        return
    prc = p.puback[info.mid]
    if getattr(prc, "is_failure", False):
        res.add("publish", False, f"the broker refused the publish to {topics.status} ({prc}): ACL denied", "acl")
        return
    echoed = readable and _wait(lambda: any(t == topics.status for t, _ in p.got), min(timeout_s, 3.0))
    if echoed:
        res.add("publish", True, f"{topics.status} acknowledged and read back")
    elif p.v5:
        res.add("publish", True, f"{topics.status} acknowledged, but not read back (may this user read it?)", "warning")
    else:
        res.add(
            "publish", False,
            f"{topics.status} acknowledged but never delivered: the broker dropped it (ACL denied; MQTT 3.1.1 "
            "brokers drop a denied publish silently)",
            "acl",
        )
