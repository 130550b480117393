"""Broker URLs and where their password comes from (gapcast.brokerurl): the URL, --password-file, $GAPCAST_MQTT_PASSWORD."""

from __future__ import annotations

import pytest

from gapcast.brokerurl import BrokerURL, parse_broker_url, resolve_broker_url


def test_parse_and_safe_str():
    b = parse_broker_url("mqtts://cloud:s%40cret@broker.example:8884")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.example", 8884, True, "cloud", "s@cret")
    assert str(b) == "mqtts://cloud@broker.example:8884" and "s@cret" not in repr(b)
    assert parse_broker_url(b) is b  # a resolved URL passes through the tools unchanged


def test_password_from_file_or_environment(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("from-file\nignored second line\n")
    assert resolve_broker_url("mqtt://cloud@h", password_file=pw, environ={}).password == "from-file"
    env = {"GAPCAST_MQTT_PASSWORD": "from-env"}
    assert resolve_broker_url("mqtt://cloud@h", environ=env).password == "from-env"
    assert resolve_broker_url("mqtt://cloud@h", password_file=pw, environ=env).password == "from-file"  # file first
    assert resolve_broker_url("mqtt://cloud:in-url@h", environ=env).password == "in-url"
    assert resolve_broker_url("mqtt://h", environ=env) == BrokerURL("h", 1883)  # no user: no password


@pytest.mark.parametrize(
    ("url", "content", "match"),
    [
        ("mqtt://h", "x", "needs a user name"),
        ("mqtt://u:p@h", "x", "both in the URL and in --password-file"),
        ("mqtt://u@h", "\n", "is empty"),
        ("mqtt://u@h", None, "cannot read it"),
    ],
)
def test_bad_password_sources_are_clear_errors(tmp_path, url, content, match):
    pw = tmp_path / "pw"
    if content is not None:
        pw.write_text(content)
    with pytest.raises(ValueError, match=match):
        resolve_broker_url(url, password_file=pw, environ={})
