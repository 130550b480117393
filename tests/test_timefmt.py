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
