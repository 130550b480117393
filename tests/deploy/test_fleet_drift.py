"""``gapcast fleet status`` lists the gateways whose model is in drift (their retained drift notice)."""

from __future__ import annotations

import json

from gapcast.cli import main
from gapcast.edge.messages import Topics, drift_message, status_message


def test_fleet_status_names_the_drifting_stations(broker, capsys):
    import paho.mqtt.client as mqtt

    prefix = "gapcast/v1"
    a, b = Topics(prefix, "gw-a"), Topics(prefix, "gw-b")
    evidence = {"station": "Dongsi", "ratio": 1.8, "n": 400, "since": "2017-01-01T00:00:00Z", "for": "1d"}
    msgs = [
        status_message(a, {"fleet": "city", "backend": "onnxruntime"}, 1e9, 3),
        status_message(b, {"fleet": "city", "backend": "onnxruntime"}, 1e9, 3),
        drift_message(a, [evidence], 1e9, 3),
        drift_message(b, [], 1e9, 3),  # cleared
    ]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        for m in msgs:
            c.publish(m.topic, m.payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()
    assert main(["fleet", "status", "--fleet", "city", "--broker", broker.url]) == 0
    table = capsys.readouterr().out.splitlines()
    (row_a,) = [ln for ln in table if ln.startswith("gw-a")]
    (row_b,) = [ln for ln in table if ln.startswith("gw-b")]
    assert row_a.endswith("DRIFT: Dongsi") and "DRIFT" not in row_b
    assert main(["fleet", "status", "--fleet", "city", "--broker", broker.url, "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert {r["gateway"]: list(r["drift"]) for r in rows} == {"gw-a": ["Dongsi"], "gw-b": []}
