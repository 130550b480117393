"""The contracts as files: every schema is valid 2020-12, the builders' payloads follow them, ``gapcast schema``
prints them, and the README's examples and subscriber snippets agree with them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from support.contracts import assert_contracts, problems, validator

from gapcast.cli import main
from gapcast.edge.messages import (
    SCHEMA_IDS,
    Rejection,
    Topics,
    deadletter_message,
    filled_message,
    forecast_message,
    mark_replayed,
    offline_payload,
    revision_message,
    status_message,
)
from gapcast.edge.schemas import NAMES, load_schema, name_of

README = Path(__file__).resolve().parents[2] / "README.md"
T0 = 1_483_228_800
TOPICS = Topics("gapcast/v1", "gw-01")
NAMES3 = ("PM2.5", "CO", "TEMP")
UNITS = {"PM2.5": "ug/m3", "CO": "ug/m3", "TEMP": "degC"}


def test_every_schema_is_valid_2020_12_and_named_like_its_payloads():
    for name in NAMES:
        s = load_schema(name)
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert s["$id"] == f"urn:gapcast:{name}:1"
        validator(name)  # check_schema raises on an invalid schema
        assert SCHEMA_IDS[name] == f"gapcast/{name}/1"
        if name not in ("reading", "manifest"):
            assert name in s["required"] or "schema" in s["required"]


def test_the_builders_payloads_follow_their_schemas():
    v, imp = np.array([470.0, 1750.0, -3.5]), np.array([False, True, False])
    out = [
        filled_message(TOPICS, "Aotizhongxin", T0, 3600, NAMES3, v, imp, "model", 3, units=UNITS),
        revision_message(TOPICS, "Aotizhongxin", T0, 3600, NAMES3, np.stack([v, v]), np.stack([imp, ~imp]), "model", 3,
                         "gap_end", units=UNITS),
        forecast_message(TOPICS, "Aotizhongxin", T0, 3600, NAMES3, np.stack([v] * 24), 0.25, "model", 3, T0 + 5,
                         units=UNITS),
        deadletter_message(TOPICS, TOPICS.readings("Aotizhongxin"), b'{"ts": 1, "values": {"PM2.5": "482"}}',
                           Rejection("bad_type", "channel 'PM2.5': a number or null is required"), T0),
    ]
    msgs = [(m.topic, m.payload) for m in out] + [(m.topic, mark_replayed(m.payload)) for m in out]
    msgs.append((TOPICS.status, offline_payload("gw-01", fleet="default")))
    from gapcast.edge.agent import AgentCore  # noqa: F401 - the status body comes from the core in the agent tests
    body = {"fleet": "default", "model": {"name": "confill", "version": 3, "cadence_s": 3600, "lookback": 96,
                                          "horizon": 24},
            "backend": "onnxruntime", "clock": "gateway", "stations": 1, "counters": {"filled": 1}, "missing": {},
            "rejected": {}}
    msgs.append((TOPICS.status, status_message(TOPICS, body, T0, 3).payload))
    assert assert_contracts(msgs) == {"filled": 2, "revision": 2, "forecast": 2, "deadletter": 2, "status": 2}
    # A string inside a number field, an unknown field, a missing unit map: each is named.
    fb = json.loads(out[0].payload)
    assert problems("filled", {**fb, "values": {"PM2.5": "470"}}) == ["values/PM2.5: '470' is not of type 'number'"]
    assert "Additional properties are not allowed ('extra' was unexpected)" in problems("filled", {**fb, "extra": 1})[0]
    assert problems("filled", {k: x for k, x in fb.items() if k != "units"}) == ["(root): 'units' is a required property"]


def test_the_model_report_follows_its_schema():
    from gapcast.edge.updater import UpdateLink

    sent = []

    class Client:
        def publish(self, topic, payload, qos, retain):
            sent.append((topic, payload))

    class Cfg:
        prefix, gateway = "gapcast/v1", "gw-01"

    link = UpdateLink(type("U", (), {"cfg": Cfg})())
    link.attach(Client())
    link.report({"gateway": "gw-01", "fleet": "default", "stage": "rejected", "ts": 1483228800.5, "reason": "bad sig"})
    assert assert_contracts(sent) == {"model": 1}


def test_gapcast_schema_lists_and_prints(capsys):
    assert main(["schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(NAMES)
    assert main(["schema", "forecast"]) == 0
    assert json.loads(capsys.readouterr().out) == load_schema("forecast")
    with pytest.raises(SystemExit):
        main(["schema", "nope"])


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 4)
    return text[start:end]


def _json_examples(section: str) -> list:
    out = []
    for block in re.findall(r"```json\n(.*?)```", section, flags=re.S):
        dec, i = json.JSONDecoder(), 0
        while i < len(block):
            if block[i].isspace():
                i += 1
                continue
            obj, i = dec.raw_decode(block, i)
            out.append(obj)
    return out


def test_the_readme_examples_follow_the_schemas():
    examples = _json_examples(_section("MQTT reference"))
    seen = []
    for ex in examples:
        name = name_of(ex) or "reading"
        assert problems(name, ex) == [], (name, ex)
        seen.append(name)
    assert sorted(set(seen)) == sorted({"reading", "filled", "revision", "forecast", "status", "deadletter"})
    # No value in a numeric field is a string (the old forecast example had "... 24 values" inside an array).
    fc = next(ex for ex in examples if name_of(ex) == "forecast")
    assert all(isinstance(v, float) for st in fc["steps"] for v in st["values"].values())


def test_the_subscriber_snippets_match_the_schemas():
    sub = _section("Subscribing")
    # Home Assistant: the field, never Jinja's dict method.
    yaml = re.search(r"```yaml\n(.*?)```", sub, flags=re.S).group(1)
    assert "value_json.values" not in yaml and "value_json['values']['PM2.5']" in yaml
    assert "value_json['steps'][0]['values']['PM2.5']" in yaml
    # Telegraf json_v2: every path and timestamp key it names is a property of the payload it parses.
    toml = re.search(r"```toml\n(.*?)```", sub, flags=re.S).group(1)
    blocks = toml.split("[[inputs.mqtt_consumer]]")[1:]
    kinds = {"filled": "filled", "revisions": "revision", "forecast": "forecast"}
    assert len(blocks) == 3
    for b in blocks:
        level = re.search(r'topics = \["gapcast/v1/stations/\+/(\w+)"\]', b).group(1)
        schema = load_schema(kinds[level])
        for key in re.findall(r'(?:path|timestamp_path) = "(\w+)"', b):
            assert key in schema["properties"], (level, key)
        for key in re.findall(r'timestamp_key = "(\w+)"', b):
            assert key in schema["properties"]["steps"]["items"]["properties"], (level, key)
        assert 'timestamp_format = "2006-01-02T15:04:05Z07:00"' in b  # RFC 3339, Go layout
