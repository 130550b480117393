"""A typed reader over one parsed TOML table whose errors name the dotted key (``mqtt.port: must be ...``).

Used by :mod:`gapcast.edge.config`; pure (no I/O beyond what the caller passes in).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gapcast.edge import ConfigError

__all__ = ["TomlTable"]


class TomlTable:
    """Typed reads from one TOML table; every error names the dotted key; leftovers are unknown keys.

    Each read (``str_``, ``bool_``, ``int_``, ``float_``, ``path``, ``list_``, ``table``) marks its key used and
    returns the default when the key is absent; :meth:`done` then rejects the keys nobody read.

    Raises:
        ConfigError: (from the constructor) the value is not a table; (from a read) the value has the wrong type,
            is outside its range or choices; (from :meth:`done`) the table holds unknown keys.
    """

    def __init__(self, data: Any, name: str, base: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table, got {type(data).__name__}")
        self.data = dict(data)
        self.name = name
        self.base = base
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}" if self.name else k

    def _get(self, k: str) -> Any:
        self.used.add(k)
        return self.data.get(k)

    def has(self, k: str) -> bool:
        return k in self.data

    def str_(self, k: str, default: str | None, *, choices: tuple[str, ...] | None = None) -> str | None:
        v = self._get(k)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ConfigError(f"{self.key(k)}: must be a string, got {v!r}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.key(k)}: must be one of {', '.join(choices)}; got {v!r}")
        return v

    def bool_(self, k: str, default: bool) -> bool:
        v = self._get(k)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"{self.key(k)}: must be true or false, got {v!r}")
        return v

    def int_(self, k: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self._get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.key(k)}: must be an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self.key(k)}: must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
        return v

    def float_(self, k: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        v = self._get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{self.key(k)}: must be a finite number, got {v!r}")
        v = float(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self.key(k)}: must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
        return v

    def path(self, k: str, default: Path | None) -> Path | None:
        v = self.str_(k, None)
        if v is None or v == "":
            return default
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def list_(self, k: str, kind: type | tuple[type, ...]) -> tuple | None:
        v = self._get(k)
        if v is None:
            return None
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, kind) for x in v):
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise ConfigError(f"{self.key(k)}: must be a list of {name}s, got {v!r}")
        return tuple(v)

    def table(self, k: str) -> TomlTable:
        self.used.add(k)
        return TomlTable(self.data.get(k), self.key(k), self.base)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            where = f"[{self.name}]" if self.name else "the top level"
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(self.key(e) for e in extra)}")
