"""The one MQTT recorder (gapcast.tools.collector) against a private Mosquitto."""

from __future__ import annotations

import pytest

from gapcast.tools.collector import CollectorError, Recorder, wait_until


@pytest.mark.broker
def test_recorder_keeps_every_message_with_its_flags(broker):
    import paho.mqtt.client as mqtt

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        pub.publish("t/a/retained", b'{"n": 0}', qos=1, retain=True).wait_for_publish(10)
        with Recorder(broker.host, broker.port, ["t/#"]) as rec:
            assert rec.wait_count(1, "/retained", timeout_s=10)
            for n in (1, 2, 3):
                pub.publish("t/b/x", f'{{"n": {n}}}'.encode(), qos=1).wait_for_publish(10)
            pub.publish("t/b/x", b"\xff not json", qos=1).wait_for_publish(10)
            assert rec.wait_count(4, "/x", timeout_s=10)
            assert [b["n"] for b in rec.bodies("/x")[:3]] == [1, 2, 3]
            assert rec.bodies("/x")[3] is None and rec.messages("/x")[3].payload == b"\xff not json"
            assert [m.retain for m in rec.messages("/retained")] == [True]
            assert rec.count(("/retained", "/x")) == 5
        pub.publish("t/a/retained", b"", qos=1, retain=True).wait_for_publish(10)  # clear it
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_recorder_names_the_broker_it_cannot_reach():
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CollectorError, match=f"127.0.0.1:{port}"):
        Recorder("127.0.0.1", port, "t/#", subscribe_timeout_s=1)


def test_wait_until_deadline():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3, 5, poll_s=0.001)
    assert len(calls) == 3
    assert not wait_until(lambda: False, 0.05, poll_s=0.01)
