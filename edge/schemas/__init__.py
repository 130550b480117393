"""The payload contracts as files: one JSON Schema (draft 2020-12) per payload in and out, shipped in the package.

``gapcast schema`` lists them; ``gapcast schema NAME`` prints one. Every output message names its contract in
``"schema": "gapcast/<name>/1"`` (:data:`gapcast.edge.messages.SCHEMA_IDS`); the schema's ``$id`` is
``urn:gapcast:<name>:1``. Readings (in) may omit ``schema``. Validating needs a JSON Schema library (the
``jsonschema`` package: the tests and ``gapcast sink`` use it); the gateway itself only builds payloads.

=============  =========  ==========================================================================
name           direction  topic
=============  =========  ==========================================================================
reading        in         ``{prefix}/stations/{station}/readings``
filled         out        ``{prefix}/stations/{station}/filled``
revision       out        ``{prefix}/stations/{station}/revisions``
forecast       out        ``{prefix}/stations/{station}/forecast``
status         out        ``{prefix}/gateways/{gateway}/status`` (retained; the Last Will too)
model          out        ``{prefix}/gateways/{gateway}/model`` (retained; fleet update stages)
deadletter     out        ``{prefix}/deadletter/{gateway}``
manifest       in         ``{prefix}/fleet/{fleet}/manifest`` (retained signed release envelope)
notice         out        ``{prefix}/gateways/{gateway}/notice`` (an event to act on: a lost broker session)
skill          out        ``{prefix}/gateways/{gateway}/skill`` (retained; rolling forecast skill)
drift          out        ``{prefix}/gateways/{gateway}/drift`` (retained; stations whose model lost to naive)
=============  =========  ==========================================================================

Source: JSON Schema 2020-12 (https://json-schema.org/draft/2020-12/json-schema-core).
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from importlib import resources
from typing import Any

from gapcast import GapcastError

__all__ = ["NAMES", "load_schema", "name_of", "register", "schema_text"]

#: Every contract, in the order ``gapcast schema`` lists them.
NAMES = ("reading", "filled", "revision", "forecast", "status", "model", "deadletter", "manifest", "notice", "skill",
         "drift")


def schema_text(name: str) -> str:
    """The JSON text of schema ``name`` (one of :data:`NAMES`).

    Raises:
        GapcastError: an unknown name (the message lists the known ones).
    """
    if name not in NAMES:
        msg = f"no schema {name!r}; the schemas are: {', '.join(NAMES)}"
        raise GapcastError(msg)
    return resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")


@cache
def _loaded(name: str) -> str:
    return schema_text(name)


def load_schema(name: str) -> dict[str, Any]:
    """Schema ``name`` as a dict (a fresh copy each call).

    Raises:
        GapcastError: an unknown name.
    """
    return json.loads(_loaded(name))


def name_of(body: Any) -> str | None:
    """The contract a parsed payload names in ``schema`` (``"gapcast/filled/1"`` -> ``filled``), else None."""
    sid = body.get("schema") if isinstance(body, dict) else None
    if isinstance(sid, str) and sid.startswith("gapcast/") and sid.count("/") == 2:
        name = sid.split("/")[1]
        return name if name in NAMES else None
    return None


def _run(args: argparse.Namespace) -> int:
    if not args.name:
        for name in NAMES:
            title = load_schema(name).get("title", "")
            print(f"{name:<11} {f'gapcast/{name}/1':<21} {title}")
        return 0
    print(schema_text(args.name), end="")
    return 0


def register(sub) -> None:
    """Add ``gapcast schema [NAME]`` to the top-level sub-commands."""
    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of a payload (no name: list them)",
        description="Print the JSON Schema (2020-12) of one MQTT payload, or list them all.",
        epilog=(
            "examples:\n"
            "  gapcast schema                      # the names, ids and titles\n"
            "  gapcast schema forecast > forecast.schema.json\n"
            "  gapcast schema filled | python -m json.tool"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", choices=NAMES, metavar="NAME", help=f"one of: {', '.join(NAMES)}")
    p.set_defaults(func=_run)
