"""The gateway's Prometheus endpoint (gapcast.edge.metrics): the exposition itself, a missing prometheus_client, and a
real Prometheus server (Debian's ``prometheus``, installed by ``make test``) scraping the running agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from support.small_agent import (
    HoldableBackend,
    Publisher,
    RunningAgent,
    current_step,
    reading,
    small_config,
    wait_for,
)

from gapcast.edge.metrics import Metrics, parse_listen
from gapcast.tools.localbroker import free_port

pytestmark = pytest.mark.timeout(90)


def _get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def test_parse_listen():
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen(":9108") == ("0.0.0.0", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    for bad in ("9108", "host:", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


def test_exposition_of_a_status_snapshot():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    m = Metrics(f"127.0.0.1:{free_port()}", gateway="gw-01", fleet="city")
    assert m.start()
    try:
        m.observe_inference("onnxruntime", 3, 0.004)
        m.observe_inference("onnxruntime", 5, 0.02)
        from gapcast.edge.messages import OutMessage

        m.count_outputs([OutMessage("gapcast/v1/stations/s1/filled", b"{}", "filled", "a"),
                         OutMessage("gapcast/v1/stations/s1/forecast", b"{}", "forecast", "b"),
                         OutMessage("gapcast/v1/deadletter/gw-01", b"{}", "deadletter", "c")])  # fmt: skip
        m.update({
            "model": {"name": "confill", "version": 3}, "backend": "onnxruntime", "stations": 2,
            "counters": {"messages": 9, "readings": 7, "readings_new": 6, "readings_late": 1, "filled": 5,
                         "forecasts": 4, "revisions": 1, "imputed_values": 3},
            "rejected": {"parse": 2}, "missing": {"null": 4}, "no_forecast_stations": 1,
            "connected": True, "uptime_s": 12.5, "shell": {"connects": 1, "published": 10},
            "outbox": {"depth": 7, "bytes": 2048, "oldest_age_s": 1.5, "dropped": {"forecast": 2}, "expired": {}},
        })  # fmt: skip
        text = _get(m.url)
        assert text == generate_latest(m.registry).decode()
    finally:
        m.close()
    lines = set(text.splitlines())
    for want in (
        'gapcast_readings_total{kind="new"} 6.0', 'gapcast_readings_total{kind="late"} 1.0',
        'gapcast_rejected_total{kind="parse"} 2.0', 'gapcast_missing_values_total{kind="null"} 4.0',
        'gapcast_outputs_total{kind="filled"} 5.0', 'gapcast_outputs_total{kind="forecast"} 4.0',
        'gapcast_outputs_total{kind="revision"} 1.0', 'gapcast_agent_events_total{kind="imputed_values"} 3.0',
        'gapcast_agent_events_total{kind="messages"} 9.0', 'gapcast_shell_events_total{kind="published"} 10.0',
        'gapcast_station_outputs_total{kind="filled",station="s1"} 1.0',
        'gapcast_station_outputs_total{kind="forecast",station="s1"} 1.0',
        'gapcast_outbox_dropped_total{kind="forecast",reason="cap"} 2.0',
        "gapcast_connected 1.0", "gapcast_stations 2.0", "gapcast_no_forecast_stations 1.0",
        "gapcast_outbox_depth_messages 7.0", "gapcast_outbox_bytes 2048.0", "gapcast_uptime_seconds 12.5",
        'gapcast_inference_batch_size_count{backend="onnxruntime"} 2.0',
        'gapcast_inference_batch_size_sum{backend="onnxruntime"} 8.0',
        'gapcast_inference_batch_size_bucket{backend="onnxruntime",le="4.0"} 1.0',
        'gapcast_inference_seconds_bucket{backend="onnxruntime",le="0.005"} 1.0',
        'gapcast_inference_seconds_bucket{backend="onnxruntime",le="0.025"} 2.0',
        'gapcast_model_info{backend="onnxruntime",fleet="city",gateway="gw-01",name="confill",version="3"} 1.0',
    ):  # fmt: skip
        assert want in lines, want
    assert not any("readings_total" in ln and 'kind="readings"' in ln for ln in lines)  # the sum is not a kind
    assert not any("deadletter" in ln and "station_outputs" in ln for ln in lines)  # unbounded names never labelled


def test_missing_prometheus_client_leaves_the_agent_running_and_the_status_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    cfg = small_config("127.0.0.1", free_port(), tmp_path, metrics={"listen": "127.0.0.1:9"})
    ra = RunningAgent(cfg, HoldableBackend())
    m = ra.agent.metrics
    assert m is not None and m.start() is False
    status = ra.agent._status_extra()["metrics"]
    assert status["listen"] == "127.0.0.1:9" and "prometheus_client is not installed" in status["error"]
    ra.agent.client.loop_stop()


def _prometheus() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if shutil.os.path.exists(p)), None)


@pytest.mark.broker
@pytest.mark.skipif(_prometheus() is None, reason="prometheus is not installed (make test installs Debian's prometheus)")
def test_a_real_prometheus_scrapes_a_counter_that_moves(broker, tmp_path):
    pytest.importorskip("prometheus_client")
    mport, pport = free_port(), free_port()
    cfg = small_config(broker.host, broker.port, tmp_path / "state", metrics={"listen": f"127.0.0.1:{mport}"})
    ra = RunningAgent(cfg, HoldableBackend()).start()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n"
        f"scrape_configs:\n  - job_name: gapcast\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
    )
    prom = subprocess.Popen(
        [_prometheus(), f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{pport}/api/v1/query?query="

    def query(q: str) -> list:
        try:
            body = json.loads(_get(api + urllib.parse.quote(q), 2))
        except OSError:
            return []
        return body["data"]["result"] if body.get("status") == "success" else []

    def value(q: str) -> float | None:
        r = query(q)
        return float(r[0]["value"][1]) if r else None

    pub = None
    try:
        wait_for(lambda: value('gapcast_outputs_total{kind="filled"}') == 0.0, 30, "the first scrape (0 filled)")
        pub = Publisher(broker.host, broker.port)
        k = current_step()
        for step in (k - 3, k - 2, k - 1, k):  # three later readings close three steps
            pub.publish(*reading(step, 40.0 if step != k - 2 else None))  # step k-2 has its one value missing
        wait_for(lambda: value('gapcast_outputs_total{kind="filled"}') == 3.0, 30, "3 filled steps in Prometheus")
        assert value('gapcast_station_outputs_total{station="s1",kind="filled"}') == 3.0
        assert value('gapcast_readings_total{kind="new"}') == 4.0
        assert value('gapcast_agent_events_total{kind="imputed_values"}') == 1.0
        assert value('gapcast_missing_values_total{kind="null"}') == 1.0
        assert value('gapcast_inference_batch_size_sum{backend="fake"}') == 3.0
        assert value("gapcast_connected") == 1.0 and value("gapcast_stations") == 1.0
        info = query("gapcast_model_info")
        assert info and info[0]["metric"]["backend"] == "fake" and info[0]["metric"]["version"] == "3"
        assert value('up{job="gapcast"}') == 1.0
    finally:
        if pub is not None:
            pub.close()
        ra.stop()
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        if prom.stderr:
            prom.stderr.close()
