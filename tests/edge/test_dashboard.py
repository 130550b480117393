"""The dashboard: its state from real agent messages, its HTTP API, and the page in a real headless chromium
against a private broker with a running agent and a replay."""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from support.small_agent import (
    CADENCE,
    PREFIX,
    HoldableBackend,
    Publisher,
    RunningAgent,
    current_step,
    small_config,
    wait_for,
)

from gapcast.edge.dashboard import DashboardServer, DashboardState, mqtt_feed
from gapcast.edge.messages import Topics, drift_message, filled_message, forecast_message, revision_message

TOPICS = Topics(PREFIX, "gw-01")
CH = ("PM2.5",)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def feed(state, msgs):
    for m in msgs:
        state.on_message(m.topic, m.payload)


def test_state_from_messages_revisions_replace_fills_and_states():
    state = DashboardState(PREFIX, max_steps=4)
    t = 1_700_000_000 // CADENCE * CADENCE
    feed(state, [
        filled_message(TOPICS, "s1", t, CADENCE, CH, np.array([10.0]), np.array([False]), "model", 3, t),
        filled_message(TOPICS, "s1", t + CADENCE, CADENCE, CH, np.array([12.0]), np.array([True]), "model", 3, t),
    ])
    assert state.snapshot()["stations"]["s1"]["state"] == "outage"  # the newest step had no observed channel
    feed(state, [
        revision_message(TOPICS, "s1", t + CADENCE, CADENCE, CH, np.array([[11.0]]), np.array([[True]]), "model", 3,
                         "gap_end", t),
        filled_message(TOPICS, "s1", t + 2 * CADENCE, CADENCE, CH, np.array([13.0]), np.array([False]), "model", 3, t),
        forecast_message(TOPICS, "s1", t + 2 * CADENCE, CADENCE, CH, np.array([[14.0], [15.0]]), 0.25, "model", 3, t),
    ])
    data = state.station("s1")
    assert [(s["epoch_s"] - t, s["status"], s["values"]["PM2.5"]) for s in data["steps"]] == [
        (0, "observed", 10.0), (CADENCE, "revised", 11.0), (2 * CADENCE, "observed", 13.0)]
    assert data["steps"][1]["fill"] == {"PM2.5": 12.0}  # the real-time fill the revision replaced
    assert data["counts"] == {"filled": 3, "revisions": 1} and data["state"] == "online"
    assert [s["values"]["PM2.5"] for s in data["forecast"]["steps"]] == [14.0, 15.0]
    feed(state, [filled_message(TOPICS, "s1", t + 2 * CADENCE, CADENCE, CH, np.array([13.0]), np.array([False]), "locf", 3, t)])
    assert state.snapshot()["stations"]["s1"]["state"] == "online"  # method "observed": nothing was filled
    feed(state, [forecast_message(TOPICS, "s1", t + 2 * CADENCE, CADENCE, CH, np.array([[1.0], [1.0]]), 0, "persistence", 3, t)])
    assert state.snapshot()["stations"]["s1"]["state"] == "fallback"
    ev = {"station": "s1", "ratio": 1.5, "n": 300, "since": "2023-11-14T00:00:00Z", "for": "1d"}
    feed(state, [drift_message(TOPICS, [ev], t, 3)])
    assert state.snapshot()["stations"]["s1"]["state"] == "drift"
    feed(state, [filled_message(TOPICS, "s1", t + k * CADENCE, CADENCE, CH, np.array([1.0]), np.array([False]), "model", 3, t)
                 for k in range(3, 6)])
    assert len(state.station("s1")["steps"]) == 4 and state.counters["dropped_steps"] == 2  # bounded, counted
    state.on_message(f"{PREFIX}/stations/s1/filled", b"{not json")
    assert state.counters["bad_payloads"] == 1


def test_http_api_and_static_files():
    state = DashboardState(PREFIX)
    t = 1_700_000_000 // CADENCE * CADENCE
    feed(state, [filled_message(TOPICS, "s1", t, CADENCE, CH, np.array([10.0]), np.array([False]), "model", 3, t)])
    srv = DashboardServer(state, "127.0.0.1:0").start()
    try:
        assert _get(srv.url + "api/state")["stations"]["s1"]["filled"] == 1
        assert _get(srv.url + "api/station/s1")["steps"][0]["values"] == {"PM2.5": 10.0}
        with urllib.request.urlopen(srv.url, timeout=5) as r:
            page = r.read().decode()
        assert "/static/uPlot.iife.min.js" in page and "cdn" not in page.lower()
        with urllib.request.urlopen(srv.url + "static/uPlot.iife.min.js", timeout=5) as r:
            assert len(r.read()) > 40_000
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(srv.url + "static/../dashboard.py", timeout=5)
    finally:
        srv.stop()


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (browser, driver) if browser and driver else None


STEPS = 24
OUTAGE = range(14, 17)  # readings of these steps are null: real-time fills, then one revision when it ends


@pytest.mark.broker
@pytest.mark.skipif(_chromium() is None, reason="chromium / chromedriver not found (make test installs Debian's chromium and chromium-driver)")
def test_the_page_in_headless_chromium_shows_a_live_agent(broker, tmp_path):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    cfg = small_config(broker.host, broker.port, tmp_path / "state")
    ra = RunningAgent(cfg, HoldableBackend()).start()
    state = DashboardState(PREFIX)
    srv = DashboardServer(state, "127.0.0.1:0").start()
    feed_client = mqtt_feed(state, broker.url)
    pub = Publisher(broker.host, broker.port)
    drv = None
    try:
        wait_for(lambda: ra.agent.connected.is_set(), timeout_s=60, what="the agent connected")
        first = current_step() - STEPS + 1
        for k in range(STEPS):
            v = None if k in OUTAGE else round(60 + 30 * math.sin(2 * math.pi * k / 12), 2)
            pub.publish(f"{PREFIX}/stations/s1/readings", json.dumps({"ts": (first + k) * CADENCE, "values": {"PM2.5": v}}).encode())
        # readings clock: every step but the newest closes; the outage's end brings one revision
        wait_for(lambda: "s1" in state.stations and state.stations["s1"].n_filled == STEPS - 1
                 and state.stations["s1"].n_revisions == 1 and state.stations["s1"].forecast is not None, timeout_s=60, what="the dashboard fed")
        assert ra.agent.core.counters["filled"] == STEPS - 1
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860"):
            opts.add_argument(a)
        drv = webdriver.Chrome(service=Service(driver_path), options=opts)
        drv.set_page_load_timeout(15)
        drv.get(srv.url + "#s1")
        # The page re-renders its lists as messages arrive: waits ignore an element replaced under them, and the
        # reads below take the DOM's state in one script call (atomic with respect to the page's own updates).
        stale = (StaleElementReferenceException,)
        WebDriverWait(drv, 15, ignored_exceptions=stale).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-plotted") == "s1")
        WebDriverWait(drv, 10, ignored_exceptions=stale).until(
            lambda d: d.find_element(By.ID, "points").text == str(STEPS - 1))
        dom = drv.execute_script("""
            const q = (s) => document.querySelector(s);
            return {row: q('li[data-station="s1"]').getAttribute("data-state"), state: q("#station-state").innerText,
                    revisions: q("#revisions").innerText, canvases: document.querySelectorAll(".plot canvas").length,
                    gw: q('dl[data-gateway="gw-01"]').innerText};""")
        assert dom["row"] == "online"
        assert dom["state"] == "online"
        assert dom["revisions"] == "1"
        assert dom["canvases"] == 1  # one channel, one uPlot canvas
        gw = dom["gw"]
        assert "fake" in gw and "v3" in gw  # backend and model version from the retained status
        # live: one more reading closes one more step, and the page follows without a reload (SSE)
        pub.publish(f"{PREFIX}/stations/s1/readings", json.dumps({"ts": (first + STEPS) * CADENCE, "values": {"PM2.5": 70.0}}).encode())
        WebDriverWait(drv, 15, ignored_exceptions=stale).until(lambda d: d.find_element(By.ID, "points").text == str(STEPS))
        # GAPCAST_DASHBOARD_SCREENSHOT=docs/dashboard.png saves it there (how the README's picture was made)
        shot = Path(os.environ.get("GAPCAST_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        drv.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        if drv is not None:
            drv.quit()
        pub.close()
        feed_client.loop_stop()
        feed_client.disconnect()
        srv.stop()
        ra.stop()


@pytest.mark.broker
def test_dashboard_section_of_edge_toml_serves_the_page_beside_the_agent(broker, tmp_path):
    from gapcast.edge.dashboard import start_in_agent

    cfg = small_config(broker.host, broker.port, tmp_path / "state", dashboard={"listen": "127.0.0.1:0"})
    assert cfg.skill.dashboard_listen == "127.0.0.1:0" and cfg.skill.enabled and cfg.skill.shadow_share == 0.0
    ra = RunningAgent(cfg, HoldableBackend()).start()
    server, stop = start_in_agent(cfg)
    try:
        wait_for(lambda: "gw-01" in _get(server.url + "api/state")["gateways"], timeout_s=60, what="the agent's status on the page")
        gw = _get(server.url + "api/state")["gateways"]["gw-01"]
        assert gw["status"]["state"] == "online" and gw["status"]["backend"] == "fake"
        wait_for(lambda: "skill" in _get(server.url + "api/state")["gateways"]["gw-01"], timeout_s=60, what="the retained skill message")
    finally:
        stop()
        ra.stop()


def test_history_at_page_load_comes_from_the_sink_store(tmp_path):
    import sqlite3

    from gapcast.sink.stores import SQLiteStore

    db = tmp_path / "sink.db"
    SQLiteStore(db).close()  # the tables exactly as gapcast sink creates them
    t = 1_700_000_000 // CADENCE * CADENCE
    con = sqlite3.connect(db)
    con.executemany(
        "INSERT INTO series VALUES (?, ?, ?, ?, ?, 3, 0, 'ug/m3', ?)",
        [("s1", "PM2.5", t + k * CADENCE, 10.0 + k, st, f"id{k}")
         for k, st in enumerate(("observed", "filled", "revised"))],
    )
    con.commit()
    con.close()
    state = DashboardState(PREFIX, sink_db=db)
    # a dashboard started after the sink: nothing live yet, the page still gets the stored steps
    data = state.station("s1")
    assert [(s["epoch_s"] - t, s["status"], s["values"]["PM2.5"], s["imputed"]) for s in data["steps"]] == [
        (0, "observed", 10.0, []), (CADENCE, "filled", 11.0, ["PM2.5"]), (2 * CADENCE, "revised", 12.0, ["PM2.5"])]
    assert data["history_steps"] == 3
    # live messages win over the stored rows of the same step
    feed(state, [filled_message(TOPICS, "s1", t + 2 * CADENCE, CADENCE, CH, np.array([99.0]), np.array([False]), "model", 3, t)])
    assert state.station("s1")["steps"][-1]["values"] == {"PM2.5": 99.0}
