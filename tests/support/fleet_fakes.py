"""Test helpers for fleet updates: signed fake bundles whose "model" is a numpy rule the card describes.

The rule (``card["fake"]``): imputed = values * scale + bias; forecast[h] = mean over the window of the observed
normalised values, times scale, plus bias; ``nan`` = true makes every output NaN. The golden outputs are computed with
the same rule, so a :class:`FakeBackend` reproduces them exactly. No onnx, no torch: the updater's logic is tested
apart from any runtime.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gapcast.edge.backends import Backend
from gapcast.edge.guard import GuardedBackend
from gapcast.edge.release import FleetTopics
from gapcast.edge.updater import Updater, UpdaterConfig

C, L, H, F = 3, 8, 4, 6
CHANNELS = ("PM2.5", "TEMP", "WSPM")
FLEET = "city"
PREFIX = "gapcast/v1"


def new_key(folder: Path, name: str = "key") -> tuple[Path, Path, Ed25519PrivateKey]:
    """An Ed25519 key pair as PEM files (private, public) and the key object."""
    key = Ed25519PrivateKey.generate()
    folder.mkdir(parents=True, exist_ok=True)
    priv = folder / f"{name}.key"
    pub = folder / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv, pub, key


def fake_outputs(fake: dict, values: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale, bias = float(fake.get("scale", 1.0)), float(fake.get("bias", 0.0))
    imputed = (values * scale + bias).astype(np.float32)
    mean = (values * observed).sum(axis=1) / np.maximum(observed.sum(axis=1), 1.0)  # [B, C]
    forecast = np.repeat((mean * scale + bias)[:, None, :], H, axis=1).astype(np.float32)
    if fake.get("nan"):
        imputed[:] = np.nan
        forecast[:] = np.nan
    return imputed, forecast


def golden_inputs(seed: int = 0, batch: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    observed = (rng.random((batch, L, C)) > 0.2).astype(np.float32)
    values = (rng.normal(size=(batch, L, C)) * observed).astype(np.float32)
    calendar = rng.normal(size=(batch, L + H, F)).astype(np.float32)
    return values, observed, calendar


def make_bundle(
    folder: Path,
    key: Ed25519PrivateKey,
    *,
    version: int = 1,
    lookback: int = L,
    cadence_s: int = 3600,
    channels: tuple[str, ...] = CHANNELS,
    mean: float = 10.0,
    fake: dict | None = None,
    golden_fake: dict | None = None,
) -> Path:
    """Write a signed fake bundle folder and return it.

    Args:
        golden_fake: the rule used for the golden outputs (default: ``fake``); differing makes the golden check fail.
    """
    fake = dict(fake or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(f"fake model v{version} {json.dumps(fake, sort_keys=True)}".encode())
    values, observed, calendar = golden_inputs(batch=2)
    values, observed = values[:, :lookback], observed[:, :lookback]
    calendar = np.zeros((2, lookback + H, F), dtype=np.float32)
    imputed, forecast = fake_outputs(dict(golden_fake if golden_fake is not None else fake), values, observed)
    np.savez(folder / "golden.npz", values=values, observed=observed, calendar=calendar, imputed=imputed,
             forecast=forecast)  # fmt: skip
    files = {}
    for name in ("model.onnx", "golden.npz"):
        data = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    card = {
        "schema_version": 1,
        "model": {"name": "confill", "version": version},
        "created": "2026-11-29T00:00:00Z",
        "channels": [
            {"name": n, "unit": "u", "valid_min": 0.0, "valid_max": 100.0, "mean": mean, "std": 5.0} for n in channels
        ],
        "cadence_s": cadence_s,
        "lookback": lookback,
        "horizon": H,
        "calendar": {"features": ["hour_sin", "hour_cos", "dow_sin", "dow_cos", "doy_sin", "doy_cos"],
                     "utc_offset_s": 28800},  # fmt: skip
        "inputs": [{"name": "values", "shape": ["batch", lookback, len(channels)], "dtype": "float32"}],
        "outputs": [{"name": "forecast", "shape": ["batch", H, len(channels)], "dtype": "float32"}],
        "files": files,
        "variants": {"fp32": {"file": "model.onnx", "precision": "fp32"}},
        "golden": {"file": "golden.npz", "max_abs": 1e-5, "mean_abs": 1e-6},
        "fake": fake,
    }
    body = json.dumps(card, indent=1, sort_keys=True).encode()
    (folder / "card.json").write_bytes(body)
    (folder / "card.sig").write_bytes(key.sign(body))
    return folder


class FakeBackend(Backend):
    """Runs the card's numpy rule. ``fail_after``: calls after which it returns NaN (a model that breaks live)."""

    name = "fake"

    def __init__(self, bundle, fail_after: int | None = None) -> None:
        self.fake = dict(bundle.card.raw.get("fake", {}))
        self.version = bundle.card.model_version
        self.fail_after = fail_after
        self.calls = 0
        self.closed = False

    def describe(self):
        return f"fake numpy rule of v{self.version}"

    def close(self):
        self.closed = True

    def run(self, values, observed, calendar):
        self.calls += 1
        imputed, forecast = fake_outputs(self.fake, np.asarray(values), np.asarray(observed))
        if self.fail_after is not None and self.calls > self.fail_after:
            forecast = forecast.copy()
            forecast[:] = np.nan
        return imputed, forecast


def fake_factory(
    fail_after: dict[int, int] | None = None,
    built: list | None = None,
    slow: dict | None = None,
    gate: dict | None = None,
):
    """A backend factory; ``fail_after[version]`` makes that version's backend break after so many calls;
    ``slow[version]`` seconds of building (a TensorRT engine build, say; only the killed-child test sleeps);
    ``gate[version]``: a ``threading.Event`` the build waits for (a build that ends when the test says so)."""

    def factory(bundle):
        time.sleep((slow or {}).get(bundle.card.model_version, 0.0))
        ev = (gate or {}).get(bundle.card.model_version)
        if ev is not None:
            ev.wait(60)
        b = FakeBackend(bundle, (fail_after or {}).get(bundle.card.model_version))
        if built is not None:
            built.append(b)
        return b

    return factory


class MqttGateway:
    """A gateway: updater + guarded backend + a paho client with a retained status and a Last Will."""

    def __init__(self, broker, tmp_path, pub, seed, name, *, fail_after=None, health_steps=2, slow=None,
                 chunk_retry_s=2.0):  # fmt: skip
        self.name = name
        self.reports: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{name}", protocol=mqtt.MQTTv5)
        cfg = UpdaterConfig(gateway=name, fleet=FLEET, state_dir=tmp_path / f"state-{name}", prefix=PREFIX,
                            health_steps=health_steps, chunk_retry_s=chunk_retry_s,
                            chunk_retry_delay_s=0.2)  # fmt: skip
        self.updater = Updater(
            cfg, trusted_keys=[pub], backend_factory=fake_factory(fail_after, slow=slow), report=self._report,
            subscribe=lambda t: self.client.subscribe(t, qos=1), unsubscribe=self.client.unsubscribe,
        )  # fmt: skip
        self.updater.start(seed)
        self.guard = GuardedBackend(self.updater)
        self.values, self.observed, _ = golden_inputs(seed=7, batch=3)
        self.calendar = np.zeros((3, 12, 6), np.float32)
        self.versions: list[int] = []
        self.forecasts: list[np.ndarray] = []
        status_topic = FleetTopics.gateway_status(PREFIX, name)
        self.client.will_set(status_topic, json.dumps({"state": "offline", "fleet": FLEET}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self.updater.on_message(msg.topic, msg.payload)
        self.broker = broker

    def _on_connect(self, client, userdata, flags, rc, props):  # network thread
        for t in self.updater.subscriptions:
            client.subscribe(t, qos=1)
        self.publish_status()

    def publish_status(self):
        body = {"state": "online", "backend": self.guard.name, **self.updater.status()}
        self.client.publish(FleetTopics.gateway_status(PREFIX, self.name), json.dumps(body), qos=1, retain=True)

    def _report(self, rep):
        self.reports.append(rep)
        self.client.publish(FleetTopics.gateway_model(PREFIX, self.name), json.dumps(rep), qos=1, retain=True)

    def connect(self):
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()
        return self

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
        self.updater.close()

    def step(self):
        """One agent step: a boundary (where updates switch in), then one batched inference."""
        self.guard.step_boundary()
        _, fc = self.guard.run(self.values, self.observed, self.calendar)
        self.versions.append(self.guard.model_version)
        self.forecasts.append(fc)
        self.publish_status()

    @property
    def stages(self):
        return [r["stage"] for r in self.reports]


def step_until(gateways, pred, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for g in gateways:
            g.step()
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout_s} s: {[(g.name, g.stages) for g in gateways]}")


def committed(g, version):
    r = g.updater.last_report
    return r is not None and r["stage"] == "active" and r.get("committed") and r["version"] == version
