"""Every message a test recorded, checked against its JSON Schema (gapcast.edge.schemas, with ``jsonschema``).

The broker tests' collectors call :func:`assert_contracts` when they close, so each payload the agent, the updater
or the fleet tools published in a test is validated: a field added, renamed or mistyped anywhere fails the test that
saw it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from functools import cache

from gapcast.edge.schemas import NAMES, load_schema, name_of

# Topic level -> schema, for the outputs (readings are inputs: tests send hostile ones on purpose).
_BY_LEVEL = {"filled": "filled", "revisions": "revision", "forecast": "forecast", "status": "status",
             "model": "model", "manifest": "manifest", "notice": "notice", "skill": "skill", "drift": "drift"}


@cache
def validator(name: str):
    """The Draft 2020-12 validator of schema ``name`` (built once per session)."""
    from jsonschema import Draft202012Validator

    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def contract_of(topic: str) -> str | None:
    """The schema an output topic's payload must follow, or None (readings, artifact chunks, probes)."""
    parts = topic.split("/")
    if "deadletter" in parts:
        return "deadletter"
    if "releases" in parts and "fleet" in parts:
        return "manifest"
    if "artifacts" in parts or "readings" in parts:
        return None
    return _BY_LEVEL.get(parts[-1])


def problems(name: str, body) -> list[str]:
    """Every schema violation of ``body`` against schema ``name``, with its JSON path."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
            for e in validator(name).iter_errors(body)]


def assert_contracts(messages: Iterable[tuple[str, object]]) -> Counter:
    """Validate recorded ``(topic, payload)`` pairs; payloads may be bytes, str or parsed JSON.

    Output topics must carry a payload valid against their schema, naming it in ``schema``; the manifest envelope's
    decoded manifest is checked against ``$defs/release`` too.

    Returns:
        How many messages of each schema were checked.

    Raises:
        AssertionError: listing the first violations.
    """
    import base64

    checked: Counter = Counter()
    bad: list[str] = []
    for topic, payload in messages:
        name = contract_of(topic)
        if name is None or payload in (b"", "", None):
            continue
        body = json.loads(payload) if isinstance(payload, bytes | str) else payload
        if name_of(body) != name:
            bad.append(f"{topic}: names schema {body.get('schema') if isinstance(body, dict) else None!r}, "
                       f"expected gapcast/{name}/1")
        bad += [f"{topic}: {p}" for p in problems(name, body)]
        if name == "manifest" and isinstance(body, dict) and "manifest" in body:
            release = {"$ref": "urn:gapcast:manifest:1#/$defs/release"}
            inner = json.loads(base64.b64decode(body["manifest"]))
            from jsonschema import Draft202012Validator
            from referencing import Registry, Resource

            reg = Registry().with_resource("urn:gapcast:manifest:1", Resource.from_contents(load_schema("manifest")))
            bad += [f"{topic} (manifest): {e.message[:300]}"
                    for e in Draft202012Validator(release, registry=reg).iter_errors(inner)]
        checked[name] += 1
    assert not bad, f"{len(bad)} contract violation(s):\n" + "\n".join(bad[:20])
    return checked


__all__ = ["NAMES", "assert_contracts", "contract_of", "problems", "validator"]
