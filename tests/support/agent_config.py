"""One writer of a test gateway's ``edge.toml`` (the agent tests, the fault tests and the sink's end-to-end test
share it): the MQTT settings a test wants (short keepalive and reconnect waits), the stations, the bundle and its
trusted key, a private state folder next to the file, and any table overridden key by key."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: What every test gateway uses unless told otherwise: quick to notice a lost broker and to come back.
MQTT_DEFAULTS = {"keepalive_s": 5, "reconnect_min_s": 1, "reconnect_max_s": 2}


def _table(name: str, values: Mapping[str, Any]) -> str:
    # json.dumps writes strings, numbers, booleans and lists of them as valid TOML values.
    return "\n".join([f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())])


def write_agent_config(
    path: Path,
    *,
    host: str,
    port: int,
    bundle: str | Path,
    trusted_key: str | Path,
    stations: Iterable[str],
    gateway: str = "gw-test",
    mqtt: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    agent: Mapping[str, Any] | None = None,
    outbox: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``edge.toml`` at ``path`` and return the path.

    Args:
        path: the file; the agent's ``state_dir`` is ``path.parent / "state"`` unless ``agent`` sets it.
        host, port: the broker.
        bundle, trusted_key: the model bundle and the public key that verifies it.
        stations: ``[stations] names``.
        gateway: ``[gateway] id``.
        mqtt, model, agent, outbox: keys that override or extend those tables (``outbox`` is written only when
            given).
    """
    tables = {
        "gateway": {"id": gateway},
        "mqtt": {"host": host, "port": port, **MQTT_DEFAULTS, **(mqtt or {})},
        "stations": {"names": list(stations)},
        "model": {"bundle": str(bundle), "trusted_keys": [str(trusted_key)], "backend": "auto", "threads": 1,
                  **(model or {})},
        "agent": {"state_dir": str(path.parent / "state"), **(agent or {})},
    }
    if outbox is not None:
        tables["outbox"] = dict(outbox)
    path.write_text("\n".join(_table(k, v) for k, v in tables.items()) + "\n")
    return path
