"""TensorRT on the gateway: build an engine from a bundle, check it against the bundle's golden outputs, cache it.

(Over 600 lines on purpose: everything that touches the TensorRT and CUDA APIs lives here, so the version
differences are handled in one place and the rest of the gateway imports none of it.)

``gapcast edge build-engine BUNDLE [--precision fp16|int8|fp32] [--max-batch N]`` calls :func:`build_engine_main`.

- The TensorRT Python API present on the device is used as it is (JetPack 5: TensorRT 8.5, JetPack 6.0: 8.6,
  JetPack 6.1/6.2: 10.3; NVIDIA's x86 wheels likewise). The differences handled here: the explicit-batch network
  flag (required before 10, the only mode in 10), ``set_memory_pool_limit`` (8.4+) versus ``max_workspace_size``,
  the name-based tensor API with ``execute_async_v3`` (8.5+, the only one in 10) versus bindings with
  ``execute_async_v2``.
- One optimization profile: batch 1..max for every input, L/H fixed. FP16 and INT8 are set as asked and never
  lowered silently: a GPU without fast FP16/INT8 is an error, and a failed build or golden check falls back to the
  next precision (int8 -> fp16 -> fp32) with a warning naming the reason; the result says what was built.
- INT8 builds the bundle's QDQ variant (explicit quantization: the scales come from the export's calibration), with
  FP16 allowed for the layers left in float; FP32 builds clear TF32 so fp32 means fp32.
- A timing cache (one per TensorRT version and GPU) speeds up rebuilds; the engine cache is keyed by TensorRT
  version, GPU, L4T release, the ONNX file's sha256, precision and max batch, and holds only engines that passed
  the golden check.

Device memory and streams go through the CUDA runtime library (``libcudart``) via ctypes, so nothing beyond
TensorRT's own Python bindings is needed. Without TensorRT or a GPU every entry point raises :class:`BackendError`
with a message saying which is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BackendError

__all__ = [
    "FALLBACK",
    "GOLDEN_TOLERANCES",
    "PRECISIONS",
    "EngineBuild",
    "GoldenCheck",
    "PlatformInfo",
    "TensorRTUnavailable",
    "Tolerance",
    "TrtRunner",
    "build_and_check",
    "build_engine",
    "build_engine_main",
    "compare_golden",
    "default_cache_dir",
    "engine_cache_key",
    "fallback_order",
    "golden_tolerance",
    "load_cached_engine",
    "parse_l4t_release",
    "platform_info",
]

log = logging.getLogger(__name__)


class TensorRTUnavailable(BackendError):
    """This machine cannot run TensorRT at all: the Python bindings, the CUDA runtime or a GPU is missing. (Any other
    :class:`BackendError` from this module means TensorRT is there and something about the engine failed.)"""


PRECISIONS = ("fp32", "fp16", "int8")
#: What to try, in order, when a precision is asked for: never higher speed than asked, lower only with a warning.
FALLBACK: dict[str, tuple[str, ...]] = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}
INPUTS = ("values", "observed", "calendar")
OUTPUTS = ("imputed", "forecast")


def fallback_order(precision: str) -> tuple[str, ...]:
    """The precisions tried for a request, best first: int8 -> fp16 -> fp32.

    Raises:
        BackendError: unknown precision.
    """
    if precision not in FALLBACK:
        msg = f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        raise BackendError(msg)
    return FALLBACK[precision]


# --------------------------------------------------------------------------------------------------- golden check


@dataclass(frozen=True)
class Tolerance:
    """Allowed difference from the bundle's fp32 golden outputs, normalised units.

    Attributes:
        max_abs: largest absolute difference of any output value.
        mean_abs: mean absolute difference over all output values.
    """

    max_abs: float
    mean_abs: float


#: Per-precision defaults. fp32: kernel-order noise only. fp16: ~3 significant digits through attention and
#: LayerNorm. int8: quantization noise of weights and activations (raised to twice what the export measured with
#: onnxruntime when the card records more, see :func:`golden_tolerance`).
GOLDEN_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, mean_abs=1e-4),
    "fp16": Tolerance(max_abs=5e-2, mean_abs=5e-3),
    "int8": Tolerance(max_abs=1.0, mean_abs=5e-2),
}


def golden_tolerance(precision: str, card_raw: dict[str, Any] | None = None) -> Tolerance:
    """The tolerance for ``precision``; for int8, at least twice the int8-vs-fp32 difference the card records."""
    tol = GOLDEN_TOLERANCES[precision]
    if precision == "int8" and card_raw:
        d = (card_raw.get("int8_delta") or {}).get("int8_qdq") or {}
        mean_d, max_d = d.get("mean_abs_diff_vs_fp32"), d.get("max_abs_diff_vs_fp32")
        tol = Tolerance(
            max_abs=max(tol.max_abs, 2.0 * float(max_d)) if max_d is not None else tol.max_abs,
            mean_abs=max(tol.mean_abs, 2.0 * float(mean_d)) if mean_d is not None else tol.mean_abs,
        )
    return tol


@dataclass(frozen=True)
class GoldenCheck:
    """Outcome of comparing a backend's outputs with the golden fp32 outputs.

    Attributes:
        ok: within tolerance and finite.
        precision: the precision judged.
        max_abs, mean_abs: the observed differences (inf when an output is not finite or has the wrong shape).
        tolerance: what was allowed.
    """

    ok: bool
    precision: str
    max_abs: float
    mean_abs: float
    tolerance: Tolerance

    def describe(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        return (
            f"golden check {verdict} for {self.precision}: max abs diff {self.max_abs:.3g} (limit "
            f"{self.tolerance.max_abs:g}), mean abs diff {self.mean_abs:.3g} (limit {self.tolerance.mean_abs:g})"
        )


def compare_golden(
    imputed: np.ndarray,
    forecast: np.ndarray,
    golden: dict[str, np.ndarray],
    precision: str,
    tolerance: Tolerance | None = None,
) -> GoldenCheck:
    """Compare outputs for the golden inputs with the golden fp32 outputs.

    Args:
        imputed: [G, L, C] float32 from the backend under test.
        forecast: [G, H, C] float32.
        golden: the bundle's ``golden.npz`` (needs ``imputed`` and ``forecast``).
        precision: ``fp32``, ``fp16`` or ``int8`` (selects the default tolerance).
        tolerance: override the default.

    Returns:
        :class:`GoldenCheck`.
    """
    tol = tolerance or GOLDEN_TOLERANCES[precision]
    ref_i, ref_f = golden["imputed"], golden["forecast"]
    if imputed.shape != ref_i.shape or forecast.shape != ref_f.shape:
        return GoldenCheck(False, precision, float("inf"), float("inf"), tol)
    diff = np.concatenate([np.abs(imputed - ref_i).ravel(), np.abs(forecast - ref_f).ravel()]).astype(np.float64)
    if not np.all(np.isfinite(diff)):
        return GoldenCheck(False, precision, float("inf"), float("inf"), tol)
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    return GoldenCheck(max_abs <= tol.max_abs and mean_abs <= tol.mean_abs, precision, max_abs, mean_abs, tol)


# --------------------------------------------------------------------------------------------------- platform


def parse_l4t_release(text: str | None) -> str:
    """The L4T release from ``/etc/nv_tegra_release``'s first line, e.g. ``R35.4.1``; ``none`` off Jetson.

    Example line: ``# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: ...``.
    """
    if not text:
        return "none"
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return "unknown"
    return f"R{m.group(1)}.{m.group(2)}"


@dataclass(frozen=True)
class PlatformInfo:
    """What an engine is only valid for.

    Attributes:
        trt_version: ``tensorrt.__version__``.
        gpu: GPU name and compute capability, e.g. ``Orin (sm87)``.
        l4t: L4T release (``R36.3.0``) or ``none`` off Jetson.
    """

    trt_version: str
    gpu: str
    l4t: str


def engine_cache_key(
    *, trt_version: str, gpu: str, l4t: str, model_sha256: str, precision: str, max_batch: int
) -> str:
    """Engine cache key: a TensorRT engine is only valid for this exact combination.

    Returns:
        ``<precision>-b<max_batch>-<24 hex>``, the hex part a sha256 over every component.
    """
    blob = json.dumps(
        {
            "trt": trt_version,
            "gpu": gpu,
            "l4t": l4t,
            "model": model_sha256,
            "precision": precision,
            "max_batch": int(max_batch),
        },
        sort_keys=True,
    ).encode()
    return f"{precision}-b{int(max_batch)}-{hashlib.sha256(blob).hexdigest()[:24]}"


def default_cache_dir() -> Path:
    """``$GAPCAST_ENGINE_CACHE``, else the user cache folder's ``engines`` (platformdirs)."""
    env = os.environ.get("GAPCAST_ENGINE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gapcast")) / "engines"


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        msg = (
            "TensorRT's Python bindings are not installed (on Jetson: `sudo apt install python3-libnvinfer`, "
            "part of JetPack; on x86: NVIDIA's `tensorrt` wheel). Use the onnxruntime backend instead."
        )
        raise TensorRTUnavailable(msg) from exc
    return trt


class _CudaRuntime:
    """The few CUDA runtime calls the TensorRT runner needs (``libcudart`` through ctypes)."""

    _H2D, _D2H = 1, 2

    def __init__(self) -> None:
        self.lib = self._load()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        count = ctypes.c_int(0)
        rc = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        if rc != 0 or count.value < 1:
            msg = f"no CUDA GPU is visible (cudaGetDeviceCount: {self._err(rc)}, {count.value} devices)"
            raise TensorRTUnavailable(msg)

    @staticmethod
    def _load():
        names = ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.10.2"]
        found = ctypes.util.find_library("cudart")
        if found:
            names.insert(0, found)
        try:  # NVIDIA's pip wheels put the runtime under nvidia/cuda_runtime/lib
            import importlib.util

            spec = importlib.util.find_spec("nvidia.cuda_runtime")
            if spec and spec.submodule_search_locations:
                for loc in spec.submodule_search_locations:
                    names.extend(str(p) for p in sorted(Path(loc, "lib").glob("libcudart.so*")))
        except (ImportError, ValueError):
            pass
        names.extend(str(p) for p in sorted(Path("/usr/local/cuda/lib64").glob("libcudart.so*")))
        for name in names:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
        msg = "the CUDA runtime (libcudart) is not found: no NVIDIA GPU stack on this machine"
        raise TensorRTUnavailable(msg)

    def _err(self, rc: int) -> str:
        s = self.lib.cudaGetErrorString(ctypes.c_int(rc))
        return s.decode() if s else f"error {rc}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = f"CUDA {what} failed: {self._err(rc)}"
            raise BackendError(msg)

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def htod(self, dst: int, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src)
        rc = self.lib.cudaMemcpy(
            ctypes.c_void_p(dst), src.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(src.nbytes), self._H2D
        )
        self._check(rc, "cudaMemcpy host->device")

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        rc = self.lib.cudaMemcpy(
            dst.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(src), ctypes.c_size_t(dst.nbytes), self._D2H
        )
        self._check(rc, "cudaMemcpy device->host")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def sync(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def device_name(self) -> str:
        buf = ctypes.create_string_buffer(8192)  # cudaDeviceProp starts with char name[256]; 8 KiB covers it all
        fn = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self._check(fn(buf, 0), "cudaGetDeviceProperties")
        name = buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0), "cudaDeviceGetAttribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0), "cudaDeviceGetAttribute")
        return f"{name} (sm{major.value}{minor.value})"


def platform_info(cuda: _CudaRuntime | None = None) -> PlatformInfo:
    """TensorRT version, GPU and L4T release of this machine.

    Raises:
        BackendError: no TensorRT or no GPU.
    """
    trt = _import_tensorrt()
    cuda = cuda or _CudaRuntime()
    try:
        text = Path("/etc/nv_tegra_release").read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        text = None
    return PlatformInfo(trt_version=str(trt.__version__), gpu=cuda.device_name(), l4t=parse_l4t_release(text))


# --------------------------------------------------------------------------------------------------- build


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(
    onnx_path: str | Path,
    precision: str,
    *,
    max_batch: int,
    lookback: int,
    horizon: int,
    n_channels: int,
    n_calendar: int,
    timing_cache: Path | None = None,
    workspace_bytes: int = 1 << 30,
    opt_batch: int | None = None,
) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file.

    Args:
        onnx_path: the bundle's fp32 file (fp32/fp16) or its QDQ file (int8).
        precision: ``fp32``, ``fp16`` or ``int8``.
        max_batch: the optimization profile's largest batch (smallest is 1).
        lookback, horizon, n_channels, n_calendar: L, H, C, F from the card.
        timing_cache: file to read tactic timings from and write them back to (created if absent).
        workspace_bytes: builder workspace memory pool limit.
        opt_batch: the batch TensorRT tunes for (default: max_batch).

    Returns:
        The serialized engine (plan) bytes.

    Raises:
        BackendError: no TensorRT, a parser error (the message lists the parser's errors), a precision the GPU
            cannot run fast (never lowered here: the caller falls back and says so), or a failed build.
    """
    trt = _import_tensorrt()
    if precision not in PRECISIONS:
        msg = f"unknown precision {precision!r}"
        raise BackendError(msg)
    if max_batch < 1:
        msg = f"max_batch must be >= 1, got {max_batch}"
        raise BackendError(msg)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse_onnx(trt, builder, logger, Path(onnx_path))
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # 8.4+
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    else:
        config.max_workspace_size = int(workspace_bytes)
    _set_precision(trt, builder, config, precision)
    shapes = {
        "values": (lookback, n_channels),
        "observed": (lookback, n_channels),
        "calendar": (lookback + horizon, n_calendar),
    }
    opt = min(max(1, opt_batch or max_batch), max_batch)
    _add_profile(builder, network, config, shapes, opt, max_batch)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        msg = f"TensorRT failed to build a {precision} engine from {Path(onnx_path).name} (see its log above)"
        raise BackendError(msg)
    log.info("built a %s engine in %.1f s", precision, time.monotonic() - t0)
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    return bytes(serialized)


def _parse_onnx(trt, builder, logger, onnx_path: Path):
    """A TensorRT network parsed from the ONNX file (explicit batch).

    Raises:
        BackendError: the parser rejects the file (the message lists the parser's errors).
    """
    major = _trt_major(trt)
    # Before TensorRT 10 an ONNX network needs the explicit-batch flag; 10 has only that mode (flag deprecated).
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        msg = f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}"
        raise BackendError(msg)
    return network


def _set_precision(trt, builder, config, precision: str) -> None:
    """Set the builder flags of ``precision``: FP16, or INT8 (+FP16 for float layers), when the GPU runs them
    fast; TF32 off for fp32 (fp32 means fp32).

    Raises:
        BackendError: the GPU has no fast FP16 / INT8 for the requested precision (never lowered here).
    """
    fast_fp16 = bool(getattr(builder, "platform_has_fast_fp16", True))
    fast_int8 = bool(getattr(builder, "platform_has_fast_int8", True))
    if precision == "fp16":
        if not fast_fp16:
            msg = "this GPU has no fast FP16; not building an FP16 engine"
            raise BackendError(msg)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        if not fast_int8:
            msg = "this GPU has no fast INT8; not building an INT8 engine"
            raise BackendError(msg)
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the QDQ nodes carry the scales
        if fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)  # layers left in float by the export may run in FP16
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32, not TF32 matmuls


def _add_profile(builder, network, config, shapes: dict[str, tuple[int, int]], opt: int, max_batch: int) -> None:
    """One optimization profile: batch 1..``max_batch`` (tuned for ``opt``), the other dimensions from ``shapes``.

    Raises:
        BackendError: the graph has an input not in ``shapes``.
    """
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            msg = f"the ONNX graph has an unexpected input {name!r}"
            raise BackendError(msg)
        tail = shapes[name]
        profile.set_shape(name, (1, *tail), (opt, *tail), (max_batch, *tail))
    config.add_optimization_profile(profile)


# --------------------------------------------------------------------------------------------------- run


class TrtRunner:
    """Runs a deserialized engine on batches of windows (any B: split into chunks of the profile's max batch).

    Args:
        engine: serialized engine bytes.
        cuda: CUDA runtime wrapper (created if None).

    Raises:
        BackendError: no TensorRT/GPU, or the engine cannot be deserialized (another TensorRT version or GPU).
    """

    def __init__(self, engine: bytes, *, cuda: _CudaRuntime | None = None) -> None:
        trt = _import_tensorrt()
        self._trt = trt
        self._cuda = cuda or _CudaRuntime()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine)
        if self._engine is None:
            msg = "TensorRT cannot deserialize the engine (built by another TensorRT version or for another GPU?)"
            raise BackendError(msg)
        self._context = self._engine.create_execution_context()
        self._v3 = hasattr(self._context, "execute_async_v3") and hasattr(self._engine, "num_io_tensors")
        if self._v3:
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            self._index = {n: i for i, n in enumerate(names)}
            shape = self._engine.get_tensor_profile_shape("values", 0)
        else:  # TensorRT < 8.5: bindings
            names = [self._engine.get_binding_name(i) for i in range(self._engine.num_bindings)]
            self._index = {n: i for i, n in enumerate(names)}
            shape = self._engine.get_profile_shape(0, self._index["values"])
        missing = [n for n in (*INPUTS, *OUTPUTS) if n not in self._index]
        if missing:
            msg = f"the engine lacks tensors {missing}"
            raise BackendError(msg)
        self.max_batch = int(shape[2][0])
        self.lookback, self.n_channels = int(shape[2][1]), int(shape[2][2])
        cal = (
            self._engine.get_tensor_profile_shape("calendar", 0)
            if self._v3
            else self._engine.get_profile_shape(0, self._index["calendar"])
        )
        self.horizon = int(cal[2][1]) - self.lookback
        self.n_calendar = int(cal[2][2])
        per_window = {
            "values": self.lookback * self.n_channels,
            "observed": self.lookback * self.n_channels,
            "calendar": (self.lookback + self.horizon) * self.n_calendar,
            "imputed": self.lookback * self.n_channels,
            "forecast": self.horizon * self.n_channels,
        }
        self._buffers = {n: self._cuda.malloc(4 * k * self.max_batch) for n, k in per_window.items()}
        self._stream = self._cuda.stream()

    def _run_chunk(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
        b = len(values)
        L, H, C = self.lookback, self.horizon, self.n_channels
        host = {"values": values, "observed": observed, "calendar": calendar}
        for name, arr in host.items():
            self._cuda.htod(self._buffers[name], np.ascontiguousarray(arr, dtype=np.float32))
        if self._v3:
            for name, arr in host.items():
                self._context.set_input_shape(name, tuple(arr.shape))
            for name, ptr in self._buffers.items():
                self._context.set_tensor_address(name, ptr)
            ok = self._context.execute_async_v3(self._stream)
        else:
            for name, arr in host.items():
                self._context.set_binding_shape(self._index[name], tuple(arr.shape))
            bindings = [0] * len(self._index)
            for name, ptr in self._buffers.items():
                bindings[self._index[name]] = ptr
            ok = self._context.execute_async_v2(bindings, self._stream)
        if not ok:
            msg = "TensorRT execution failed"
            raise BackendError(msg)
        self._cuda.sync(self._stream)
        imputed = np.empty((b, L, C), dtype=np.float32)
        forecast = np.empty((b, H, C), dtype=np.float32)
        self._cuda.dtoh(imputed, self._buffers["imputed"])
        self._cuda.dtoh(forecast, self._buffers["forecast"])
        return imputed, forecast

    def run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """values/observed [B, L, C], calendar [B, L+H, F] float32 -> (imputed [B, L, C], forecast [B, H, C])."""
        outs = [
            self._run_chunk(values[s : s + self.max_batch], observed[s : s + self.max_batch],
                            calendar[s : s + self.max_batch])
            for s in range(0, len(values), self.max_batch)
        ]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def close(self) -> None:
        """Free the device buffers (idempotent)."""
        for ptr in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers = {}

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


# --------------------------------------------------------------------------------------------------- build + check


@dataclass(frozen=True)
class EngineBuild:
    """Result of :func:`build_and_check`.

    Attributes:
        requested: the precision asked for.
        precision: the precision built and checked (lower than ``requested`` only after a logged fallback).
        engine_path: the cached engine file.
        key: its cache key.
        golden: the golden check it passed.
        attempts: ``(precision, outcome)`` for every precision tried, in order.
        cached: True when the engine came from the cache instead of a build.
        build_s: wall time of the whole build and check, every precision tried included, seconds (monotonic).
    """

    requested: str
    precision: str
    engine_path: Path
    key: str
    golden: GoldenCheck
    attempts: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    cached: bool = False
    build_s: float = 0.0


def _variant_for(precision: str) -> str:
    return "int8_qdq" if precision == "int8" else "fp32"


def build_and_check(
    bundle,
    precision: str = "fp16",
    *,
    max_batch: int = 64,
    cache_dir: str | Path | None = None,
    workspace_bytes: int = 1 << 30,
    rebuild: bool = False,
) -> EngineBuild:
    """Build (or take from the cache) an engine for a verified bundle, check it on the golden windows, fall back.

    Args:
        bundle: a verified :class:`gapcast.edge.bundle.Bundle`.
        precision: ``int8``, ``fp16`` or ``fp32``; on a failed build or golden check the next one in
            :data:`FALLBACK` is tried and a warning says why.
        max_batch: the optimization profile's largest batch.
        cache_dir: engine cache folder (default :func:`default_cache_dir`).
        workspace_bytes: builder workspace limit.
        rebuild: ignore cached engines.

    Returns:
        :class:`EngineBuild`.

    Raises:
        BackendError: no TensorRT or GPU, no golden data in the bundle, or no precision passed.
    """
    t0 = time.monotonic()
    order = fallback_order(precision)
    _import_tensorrt()  # say "no TensorRT" before "no GPU"
    golden = bundle.golden()
    if golden is None:
        msg = "the bundle has no golden inputs/outputs: cannot check an engine"
        raise BackendError(msg)
    cuda = _CudaRuntime()
    info = platform_info(cuda)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "_", info.gpu).strip("_")
    timing = cache / f"timing-trt{info.trt_version}-{gpu_slug}.cache"
    attempts: list[tuple[str, str]] = []
    for i, p in enumerate(order):
        nxt = order[i + 1] if i + 1 < len(order) else None
        got = _try_precision(
            bundle, p, nxt, golden, cuda, info, cache, timing, attempts,
            max_batch=max_batch, workspace_bytes=workspace_bytes, rebuild=rebuild,
        )
        if got is None:
            continue
        engine_path, key, check, cached = got
        _write_engine_meta(engine_path, bundle, info, p, precision, max_batch, check)
        if p != precision:
            log.warning("built %s instead of the requested %s (see the reasons above)", p, precision)
        return EngineBuild(precision, p, engine_path, key, check, tuple(attempts), cached, time.monotonic() - t0)
    msg = "no TensorRT engine passed its checks:\n  " + "\n  ".join(f"{p}: {o}" for p, o in attempts)
    raise BackendError(msg)


def _try_precision(
    bundle, p: str, nxt: str | None, golden: dict[str, Any], cuda, info: PlatformInfo, cache: Path, timing: Path,
    attempts: list[tuple[str, str]], *, max_batch: int, workspace_bytes: int, rebuild: bool,
) -> tuple[Path, str, GoldenCheck, bool] | None:
    """One precision of :func:`build_and_check`: take the cached engine or build one, run it on the golden windows
    and keep it (written atomically into ``cache``) when it passes.

    Every outcome is appended to ``attempts`` as ``(precision, what happened)``; a skip or a failure logs a warning
    naming ``nxt``, the precision tried next.

    Returns:
        ``(engine_path, cache_key, check, cached)`` when the engine passed; None when it was skipped (no such
        variant in the bundle), failed to build or run, or failed the golden check (its cached file is removed).
    """
    card = bundle.card
    variant = _variant_for(p)
    if variant not in card.variants:
        reason = (card.raw.get("excluded_variants") or {}).get(variant, "not in the bundle")
        outcome = f"skipped: the bundle has no {variant} variant ({reason})"
        attempts.append((p, outcome))
        log.warning("%s engine %s; falling back to %s", p, outcome, nxt)
        return None
    dims = {"lookback": card.lookback, "horizon": card.horizon, "n_channels": card.n_inputs}
    n_calendar = int(golden["calendar"].shape[-1])
    fname = card.variants[variant]["file"]
    key = engine_cache_key(
        trt_version=info.trt_version,
        gpu=info.gpu,
        l4t=info.l4t,
        model_sha256=card.files[fname]["sha256"],
        precision=p,
        max_batch=max_batch,
    )
    engine_path = cache / f"{key}.engine"
    cached = engine_path.is_file() and not rebuild
    try:
        if cached:
            plan = engine_path.read_bytes()
        else:
            plan = build_engine(
                bundle.path / fname,
                p,
                max_batch=max_batch,
                n_calendar=n_calendar,
                timing_cache=timing,
                workspace_bytes=workspace_bytes,
                **dims,
            )
        runner = TrtRunner(plan, cuda=cuda)
        try:
            imp, fc = runner.run(golden["values"], golden["observed"], golden["calendar"])
        finally:
            runner.close()
    except BackendError as exc:
        attempts.append((p, f"build/run failed: {exc}"))
        log.warning("%s engine failed (%s); falling back to %s", p, exc, nxt)
        return None
    check = compare_golden(imp, fc, golden, p, golden_tolerance(p, card.raw))
    if not check.ok:
        attempts.append((p, check.describe()))
        log.warning("%s; falling back to %s", check.describe(), nxt)
        engine_path.unlink(missing_ok=True)
        return None
    attempts.append((p, check.describe()))
    if not cached:
        tmp = engine_path.with_suffix(".tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, engine_path)
    return engine_path, key, check, cached


def _write_engine_meta(
    engine_path: Path, bundle, info: PlatformInfo, p: str, requested: str, max_batch: int, check: GoldenCheck
) -> None:
    """The engine's sidecar JSON (``<key>.json``): platform, model file and hashes, precision and golden figures
    (what :func:`load_cached_engine` matches on).

    Raises:
        OSError: the file cannot be written.
    """
    card = bundle.card
    fname = card.variants[_variant_for(p)]["file"]
    meta = {
        **asdict(info),
        "model_file": fname,
        "model_sha256": card.files[fname]["sha256"],
        "bundle_card_sha256": bundle.card_sha256,
        "model_version": card.model_version,
        "precision": p,
        "requested": requested,
        "max_batch": max_batch,
        "golden": {"max_abs": check.max_abs, "mean_abs": check.mean_abs, "tolerance": asdict(check.tolerance)},
    }
    engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_cached_engine(
    bundle, *, precisions: tuple[str, ...] = ("int8", "fp16", "fp32"), cache_dir: str | Path | None = None
) -> tuple[TrtRunner, dict[str, Any]]:
    """Open the best cached engine for this bundle on this machine (one that passed its golden check).

    Args:
        bundle: a verified bundle.
        precisions: the precisions acceptable, best first.
        cache_dir: engine cache folder.

    Returns:
        (runner, the engine's metadata: precision, max_batch, golden figures, platform).

    Raises:
        BackendError: no TensorRT/GPU, or no engine cached for this bundle, TensorRT version, GPU and L4T release.
    """
    _import_tensorrt()  # say "no TensorRT" before "no GPU"
    cuda = _CudaRuntime()
    info = platform_info(cuda)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    metas = []
    for p in sorted(cache.glob("*.json")) if cache.is_dir() else []:
        try:
            metas.append((p, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    for precision in precisions:
        variant = _variant_for(precision)
        if variant not in bundle.card.variants:
            continue
        sha = bundle.card.files[bundle.card.variants[variant]["file"]]["sha256"]
        matches = [
            (p, m)
            for p, m in metas
            if m.get("precision") == precision
            and m.get("model_sha256") == sha
            and (m.get("trt_version"), m.get("gpu"), m.get("l4t")) == (info.trt_version, info.gpu, info.l4t)
            and p.with_suffix(".engine").is_file()
        ]
        if matches:
            p, m = max(matches, key=lambda pm: int(pm[1].get("max_batch", 0)))
            return TrtRunner(p.with_suffix(".engine").read_bytes(), cuda=cuda), m
    msg = (
        f"no TensorRT engine cached in {cache} for this bundle on TensorRT {info.trt_version}, {info.gpu}, "
        f"L4T {info.l4t}: run `gapcast edge build-engine BUNDLE` first"
    )
    raise BackendError(msg)


def build_engine_main(args) -> int:
    """``gapcast edge build-engine``: verify the bundle, build, check, cache; log what was built.

    A library function: it logs (``gapcast.edge.trt``, INFO; the lowered-precision notice as a WARNING) and
    returns; the command line shows those lines through the CLI's logging set-up.

    Reads from ``args``: ``bundle`` (path), ``precision`` (default fp16), ``max_batch`` (default 64), and optionally
    ``trusted_keys`` or ``public_key`` (Ed25519 public key PEM paths/hex; without one the signature is not checked
    and a warning says so), ``cache_dir``, ``workspace_mb`` (default 1024), ``rebuild``.

    Returns:
        0 when an engine passed its golden check (at the requested precision or, with a logged warning, a lower one).

    Raises:
        BackendError: no TensorRT, no GPU, or no precision passed (gapcast's CLI prints the message, exit 1).
        BundleError: the bundle does not verify.
    """
    from gapcast.edge.bundle import verify_bundle

    keys = getattr(args, "trusted_keys", None) or getattr(args, "public_key", None)
    if isinstance(keys, (str, Path)):
        keys = [keys]
    _import_tensorrt()  # fail fast with the install hint before touching the bundle
    if keys:
        bundle = verify_bundle(args.bundle, list(keys))
    else:
        log.warning("no trusted public key given: checking the bundle's file hashes but NOT its signature")
        bundle = verify_bundle(args.bundle, require_signature=False)
    precision = getattr(args, "precision", None) or "fp16"
    result = build_and_check(
        bundle,
        precision,
        max_batch=int(getattr(args, "max_batch", None) or 64),
        cache_dir=getattr(args, "cache_dir", None),
        workspace_bytes=int(getattr(args, "workspace_mb", None) or 1024) << 20,
        rebuild=bool(getattr(args, "rebuild", False)),
    )
    log.info("engine: %s (%s)", result.engine_path, "from cache" if result.cached else "built")
    log.info("precision: %s (requested %s); key %s", result.precision, result.requested, result.key)
    log.info("%s", result.golden.describe())
    if result.precision != result.requested:
        lowered = "; ".join(f"{p}: {outcome}" for p, outcome in result.attempts[:-1])
        log.warning("precision lowered from %s to %s: %s", result.requested, result.precision, lowered)
    return 0
