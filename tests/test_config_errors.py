"""A bad key in a training config or in edge.toml is reported with the file it is in (issue 12 review: a user with
several configs must not have to guess which one is wrong)."""

from __future__ import annotations

import pytest


def test_training_config_errors_name_the_file(tmp_path):
    from gapcast.train import TrainError
    from gapcast.train.config import load_config

    bad = tmp_path / "mine.toml"
    bad.write_text('[model]\nlookback = "4x"\n')
    with pytest.raises(TrainError, match=r"mine\.toml: \[model\] lookback = '4x' is not a duration"):
        load_config(bad)
    bad.write_text("[model]\nbogus = 1\n")
    with pytest.raises(TrainError, match=r"mine\.toml: unknown key\(s\) \['bogus'\] in \[model\]"):
        load_config(bad)


def test_edge_config_errors_name_the_file_once(tmp_path):
    from gapcast.edge.config import ConfigError, load_config

    bad = tmp_path / "edge.toml"
    bad.write_text('[gateway]\nid = "gw-01"\n[broker]\nurl = "mqtt://127.0.0.1:1883"\n')
    with pytest.raises(ConfigError, match=r"edge\.toml: stations: list stations\.names") as err:
        load_config(bad)
    assert str(err.value).count("edge.toml") == 1
    bad.write_text("broker = [\n")
    with pytest.raises(ConfigError, match=r"edge\.toml is not valid TOML") as err:
        load_config(bad)
    assert str(err.value).count("edge.toml") == 1


def test_coordinates_of_a_station_the_gateway_does_not_serve_are_refused(tmp_path):
    from gapcast.edge.config import ConfigError, load_config

    cfg = tmp_path / "edge.toml"
    base = '[gateway]\nid = "gw-01"\n[model]\nbundle = "b"\ntrusted_keys = ["k"]\n'
    cfg.write_text(base + '[stations]\nnames = ["site-A"]\n[stations.coordinates]\nsite-Q = [52.0, 13.4]\n')
    with pytest.raises(ConfigError, match=r"stations\.coordinates\.site-Q: not in stations\.names"):
        load_config(cfg)
    # With auto-registration a station not seen yet may well have a position.
    cfg.write_text(base + '[stations]\nauto_register = true\n[stations.coordinates]\nsite-Q = [52.0, 13.4]\n')
    assert load_config(cfg).stations.coordinates == {"site-Q": (52.0, 13.4)}
