"""TensorRT and CUDA faked at their boundary (``gapcast.edge.trt``), for CPU tests of the engine paths.

A "build" returns a small JSON plan naming the precision and the ONNX file; the "runner" answers with the golden
outputs of the bundle that ONNX file belongs to (``golden.npz`` beside it), plus a per-precision offset, so a golden
check passes or fails as the test says. Everything else — fallback order, cache keys, metadata, golden checks, the
updater's staging — is the real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gapcast.edge import BackendError
from gapcast.edge import trt as T

INFO = T.PlatformInfo(trt_version="10.3.0", gpu="Fake GPU (sm87)", l4t="R36.4.0")


class FakeTensorRT:
    """Install with :meth:`install`. Attributes the test may change at any time:

    Attributes:
        noise: precision -> offset added to every output (0: the golden outputs exactly).
        fail_build: precisions whose build raises BackendError.
        break_after: model version -> runner calls after which a runner returns NaN (a model that breaks live).
        calls: ``(precision, onnx file name, max_batch)`` of every build.
        runners: every runner made, in order.
    """

    def __init__(self, noise=None, fail_build=(), break_after=None) -> None:
        self.noise = dict(noise or {"int8": 0.0, "fp16": 0.0, "fp32": 0.0})
        self.fail_build = set(fail_build)
        self.break_after = dict(break_after or {})
        self.calls: list[tuple[str, str, int]] = []
        self.runners: list = []

    def install(self, monkeypatch) -> FakeTensorRT:
        fake = self

        def build_engine(onnx_path, precision, **kw):
            fake.calls.append((precision, Path(onnx_path).name, kw["max_batch"]))
            if precision in fake.fail_build:
                msg = f"cannot build {precision}"
                raise BackendError(msg)
            return json.dumps({"precision": precision, "onnx": str(onnx_path)}).encode()

        class FakeRunner:
            max_batch = 64

            def __init__(self, plan, cuda=None):
                p = json.loads(plan)
                self.precision = p["precision"]
                folder = Path(p["onnx"]).parent
                with np.load(folder / "golden.npz") as z:
                    self.golden = {k: z[k] for k in z.files}
                self.version = json.loads((folder / "card.json").read_text())["model"]["version"]
                _, self.lookback, self.n_channels = self.golden["imputed"].shape
                self.horizon = self.golden["forecast"].shape[1]
                self.n_calendar = self.golden["calendar"].shape[2]
                self.calls = 0
                self.closed = False
                fake.runners.append(self)

            def run(self, values, observed, calendar):
                self.calls += 1
                idx = np.arange(len(values)) % len(self.golden["imputed"])
                off = fake.noise[self.precision]
                imp, fc = self.golden["imputed"][idx] + off, self.golden["forecast"][idx] + off
                limit = fake.break_after.get(self.version)
                if limit is not None and self.calls > limit:
                    fc = np.full_like(fc, np.nan)
                return imp.astype(np.float32), fc.astype(np.float32)

            def close(self):
                self.closed = True

        monkeypatch.setattr(T, "_import_tensorrt", lambda: None)
        monkeypatch.setattr(T, "_CudaRuntime", lambda: None)
        monkeypatch.setattr(T, "platform_info", lambda cuda=None: INFO)
        monkeypatch.setattr(T, "build_engine", build_engine)
        monkeypatch.setattr(T, "TrtRunner", FakeRunner)
        return self
