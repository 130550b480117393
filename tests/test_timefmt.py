"""gapcast.timefmt (the one RFC 3339 formatter/parser) and the CLI's refusal to hide a broken part."""

from __future__ import annotations

import pytest

from gapcast import cli
from gapcast.timefmt import format_rfc3339, parse_rfc3339


def test_rfc3339_hand_computed():
    # 2016-05-01T00:00:00Z = 1462060800 (16,922 days after 1970-01-01).
    assert format_rfc3339(16922 * 86400) == "2016-05-01T00:00:00Z"
    assert format_rfc3339(1462060800.9) == "2016-05-01T00:00:00Z"  # whole seconds, truncated
    assert parse_rfc3339("2016-05-01T00:00:00Z") == 1462060800
    assert parse_rfc3339("2016-05-01T08:00:00+08:00") == 1462060800
    assert parse_rfc3339("2016-05-01 00:00:00.5z") == 1462060800.5


@pytest.mark.parametrize("bad", ["2016-05-01", "2016-05-01T00:00:00", "yesterday", "2016-13-01T00:00:00Z"])
def test_rfc3339_refuses(bad):
    with pytest.raises(ValueError):
        parse_rfc3339(bad)


def test_a_part_that_fails_to_import_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_PARTS", (*cli._PARTS, "gapcast.no_such_part"))
    assert cli.main(["--help"]) == 1
    err = capsys.readouterr().err
    assert "gapcast.no_such_part" in err and "could not be loaded" in err


def test_durations_hand_computed():
    from gapcast.duration import DurationError, format_duration, parse_duration, steps_of

    assert parse_duration("96h") == 345600 and parse_duration("30min") == 1800 and parse_duration("1.5h") == 5400
    assert steps_of("72h", 600) == 432 and steps_of("4d", 3600) == 96 and steps_of("1d", 86400) == 1
    assert format_duration(86400) == "1d" and format_duration(5400) == "90min" and format_duration(600) == "10min"
    for bad, cadence in (("7min", 600), ("30min", 3600)):
        with pytest.raises(DurationError, match="not a multiple of the cadence"):
            steps_of(bad, cadence, key="block")
    for bad in ("96", "3 parsecs", "-1h", "0h"):
        with pytest.raises(DurationError):
            parse_duration(bad)
    # Compound spans add up, largest unit first (as systemd's and Go's); a repeated or rising unit is refused.
    assert parse_duration("1h30min") == 5400 and parse_duration("2d 12h") == 216000 and parse_duration("1m30s") == 90
    for bad in ("30min1h", "1h1h", "1h 30", "1h30minx"):
        with pytest.raises(DurationError, match="largest first"):
            parse_duration(bad)
    with pytest.raises(DurationError, match="its unit"):
        parse_duration(96)  # type: ignore[arg-type]
