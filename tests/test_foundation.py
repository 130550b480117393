"""Packaging, the console script, import isolation of the gateway code, and the private broker."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from gapcast.baselines import linear_interpolate, locf, seasonal_naive
from gapcast.calendar import calendar_features

_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'pandas', 'onnx', 'onnxscript'):
            raise ImportError(f'blocked on the gateway: {name}')
        return None
sys.meta_path.insert(0, Block())
"""


def test_edge_imports_without_torch_or_pandas():
    import gapcast

    root = __import__("pathlib").Path(gapcast.__file__).resolve().parents[1] / "edge"
    mods = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    code = _BLOCK + "import gapcast.edge\n" + "".join(f"import gapcast.edge.{m}\n" for m in mods)
    code += "import gapcast.calendar, gapcast.baselines\nprint('ok', len(sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_no_bare_top_level_packages(tmp_path):
    # Run outside the checkout so the repository folder itself is not on sys.path.
    code = (
        "import importlib.util, gapcast.train, gapcast.edge, gapcast.export, gapcast.deploy\n"
        "print([b for b in ('train', 'edge', 'export', 'deploy', 'bench') if importlib.util.find_spec(b)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "gapcast.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "data" in out.stdout


def test_calendar_features_hand_computed():
    # 1970-01-05T06:00Z was a Monday, 06:00 UTC; at UTC+8 it is 14:00 Monday.
    cal = calendar_features([4 * 86400 + 6 * 3600], utc_offset_s=8 * 3600)[0]
    assert cal[0] == pytest.approx(__import__("math").sin(2 * 3.141592653589793 * 14 / 24), abs=1e-6)
    assert cal[2] == pytest.approx(0.0, abs=1e-6) and cal[3] == pytest.approx(1.0, abs=1e-6)  # Monday


def test_baselines_hand_computed():
    import numpy as np

    v = np.array([[1.0, 9.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    m = np.array([[1, 1], [0, 0], [0, 0], [1, 0], [0, 0]], dtype=bool)
    np.testing.assert_allclose(locf(v, m)[:, 0], [1, 1, 1, 4, 4])
    np.testing.assert_allclose(linear_interpolate(v, m)[:, 0], [1, 2, 3, 4, 4])
    np.testing.assert_allclose(linear_interpolate(v, m)[:, 1], [9, 9, 9, 9, 9])
    lead = np.array([0.0, 2.0, 0.0], dtype=np.float32)
    np.testing.assert_allclose(locf(lead, np.array([0, 1, 0], bool)), [2, 2, 2])  # backward fill at the start
    hist = np.arange(48, dtype=np.float32)[:, None]
    np.testing.assert_allclose(seasonal_naive(hist, np.ones_like(hist, bool), 3)[:, 0], [24, 25, 26])


@pytest.mark.broker
def test_private_broker_round_trip(broker):
    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    ready = threading.Event()
    done = threading.Event()

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe("gapcast/v1/test", qos=1)

    def on_subscribe(client, userdata, mid, rcs, props):
        ready.set()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-sub", protocol=mqtt.MQTTv5)
    sub.on_connect, sub.on_subscribe, sub.on_message = on_connect, on_subscribe, on_message
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    try:
        assert ready.wait(10)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-pub", protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        pub.publish("gapcast/v1/test", b'{"hello": 1}', qos=1).wait_for_publish(10)
        assert done.wait(10)
        assert got == [b'{"hello": 1}']
        pub.loop_stop()
        pub.disconnect()
    finally:
        sub.loop_stop()
        sub.disconnect()


def _python310() -> str | None:
    import shutil
    from pathlib import Path

    cands = sorted(str(p) for p in (Path.home() / ".pyenv/versions").glob("3.10*/bin/python"))
    for cand in [*cands, shutil.which("python3.10")]:
        if cand and Path(cand).is_file():
            ok = subprocess.run([cand, "--version"], capture_output=True, text=True, timeout=30)
            if ok.returncode == 0 and ok.stdout.startswith("Python 3.10"):
                return cand
    return None


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_gateway_code_compiles_on_python_310():
    """JetPack 6's TensorRT bindings are for Python 3.10: the gateway code must at least parse there."""
    py310 = _python310()
    import gapcast

    root = __import__("pathlib").Path(gapcast.__file__).resolve().parents[1]
    files = [str(p) for d in ("edge", "gapcast") for p in sorted((root / d).glob("*.py"))]
    out = subprocess.run([py310, "-m", "py_compile", *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_broker_url_parsing():
    from gapcast.brokerurl import parse_broker_url

    b = parse_broker_url("mqtts://gw%2D1:p%40ss@broker.example")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.example", 8883, True, "gw-1", "p@ss")
    assert parse_broker_url("10.0.0.5:1999").port == 1999 and not parse_broker_url("10.0.0.5").tls
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)
