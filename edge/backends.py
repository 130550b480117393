"""Inference backends on the gateway: one interface over TensorRT and onnxruntime (docs/ARCHITECTURE.md, "Contracts").

Every backend takes a batch of B station windows and returns float32 numpy arrays::

    imputed, forecast = backend.run(values, observed, calendar)
    # values, observed: [B, L, C] float32 (normalised; observed 1/0), calendar: [B, L+H, F] float32
    # imputed: [B, L, C], forecast: [B, H, C], normalised

:func:`select_backend` tries TensorRT (a cached engine that passed the bundle's golden check, see
:mod:`gapcast.edge.trt`), then onnxruntime with the best execution provider available, and reports which one runs
(``backend.name``, ``backend.describe()``) and why the others were passed over (``backend.selection``). The
plain-interpolation fallback when no model runs at all is the agent's business, not a backend.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.edge import BackendError

__all__ = [
    "BACKEND_ORDER",
    "ORT_PROVIDER_PREFERENCE",
    "Backend",
    "OrtBackend",
    "TrtBackend",
    "select_backend",
]

log = logging.getLogger(__name__)

BACKEND_ORDER = ("tensorrt", "onnxruntime")
#: onnxruntime execution providers in order of preference (TensorRT itself is the TrtBackend's job).
ORT_PROVIDER_PREFERENCE = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)


class Backend(ABC):
    """Runs the bundle's model on batches of windows.

    Attributes:
        name: ``tensorrt`` or ``onnxruntime``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        lookback, horizon, n_channels, n_calendar: L, H, C, F.
        selection: ``(backend, reason)`` for each backend passed over before this one was chosen.
    """

    name: str = "backend"
    precision: str = "fp32"

    def __init__(self, lookback: int, horizon: int, n_channels: int, n_calendar: int) -> None:
        self.lookback, self.horizon, self.n_channels, self.n_calendar = lookback, horizon, n_channels, n_calendar
        self.selection: list[tuple[str, str]] = []

    def _validate(
        self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L, H, C, F = self.lookback, self.horizon, self.n_channels, self.n_calendar
        v = np.asarray(values, dtype=np.float32)
        o = np.asarray(observed, dtype=np.float32)
        c = np.asarray(calendar, dtype=np.float32)
        if v.ndim != 3 or v.shape[1:] != (L, C) or o.shape != v.shape or c.shape != (len(v), L + H, F):
            msg = (
                f"batch shapes values {v.shape}, observed {o.shape}, calendar {c.shape} do not match the model "
                f"([B, {L}, {C}], [B, {L}, {C}], [B, {L + H}, {F}])"
            )
            raise BackendError(msg)
        if len(v) == 0:
            msg = "empty batch"
            raise BackendError(msg)
        # The graph multiplies values by the mask, and NaN * 0 is NaN: unobserved cells must hold a number.
        v = np.where(o > 0.5, v, np.float32(0.0)).astype(np.float32)
        if not (np.isfinite(v).all() and np.isfinite(c).all()):
            msg = "non-finite observed values or calendar features in the batch"
            raise BackendError(msg)
        return np.ascontiguousarray(v), np.ascontiguousarray(o), np.ascontiguousarray(c)

    def run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fill and forecast a batch of windows.

        Args:
            values: [B, L, C] float32, normalised; anything where ``observed`` is 0 (it is zeroed here).
            observed: [B, L, C] float32, 1 = observed.
            calendar: [B, L+H, F] float32 calendar features of the past and future steps.

        Returns:
            (imputed [B, L, C], forecast [B, H, C]) float32, normalised.

        Raises:
            BackendError: wrong shapes, non-finite observed values, or a failed run.
        """
        v, o, c = self._validate(values, observed, calendar)
        imp, fc = self._run(v, o, c)
        return np.asarray(imp, dtype=np.float32), np.asarray(fc, dtype=np.float32)

    @abstractmethod
    def _run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backend-specific run on validated, contiguous float32 arrays."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and the gateway status: backend, precision, device."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to free
        """Release resources (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrtBackend(Backend):
    """onnxruntime with the best available execution provider.

    Args:
        model_path: ONNX file (one of the bundle's variants).
        lookback, horizon, n_channels, n_calendar: L, H, C, F from the card.
        precision: the variant's precision (reported only).
        threads: intra-op threads (None: onnxruntime's default, all cores).
        providers: execution providers to use, best first (default: :data:`ORT_PROVIDER_PREFERENCE` filtered by
            what this onnxruntime build offers).

    Raises:
        BackendError: onnxruntime is missing or cannot load the file.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        *,
        lookback: int,
        horizon: int,
        n_channels: int,
        n_calendar: int,
        precision: str = "fp32",
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__(lookback, horizon, n_channels, n_calendar)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            msg = "onnxruntime is not installed: pip install 'gapcast[edge]'"
            raise BackendError(msg) from exc
        available = ort.get_available_providers()
        wanted = providers or [p for p in ORT_PROVIDER_PREFERENCE if p in available]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=wanted)
        except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
            msg = f"onnxruntime cannot load {model_path}: {exc}"
            raise BackendError(msg) from exc
        self.precision = precision
        self.threads = threads
        self.model_path = Path(model_path)
        self.providers = list(self._session.get_providers())
        self.onnxruntime_version = ort.__version__

    def _run(self, values, observed, calendar):
        try:
            imp, fc = self._session.run(
                ["imputed", "forecast"], {"values": values, "observed": observed, "calendar": calendar}
            )
        except Exception as exc:  # onnxruntime's own exception types
            msg = f"onnxruntime run failed: {exc}"
            raise BackendError(msg) from exc
        return imp, fc

    def describe(self) -> str:
        threads = self.threads if self.threads else "default"
        return (
            f"onnxruntime {self.onnxruntime_version} {self.providers[0]} ({self.precision}, "
            f"{self.model_path.name}, threads {threads})"
        )


class TrtBackend(Backend):
    """A TensorRT engine (see :mod:`gapcast.edge.trt`) behind the backend interface.

    Args:
        runner: a :class:`gapcast.edge.trt.TrtRunner`.
        precision: the engine's precision.
        n_calendar: F (the runner reads L, H, C from the engine).
        meta: the engine's cache metadata (reported by :meth:`describe`).
    """

    name = "tensorrt"

    def __init__(self, runner, *, precision: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(runner.lookback, runner.horizon, runner.n_channels, runner.n_calendar)
        self._runner = runner
        self.precision = precision
        self.meta = meta or {}

    def _run(self, values, observed, calendar):
        return self._runner.run(values, observed, calendar)

    def describe(self) -> str:
        m = self.meta
        return (
            f"TensorRT {m.get('trt_version', '?')} on {m.get('gpu', '?')} ({self.precision}, max batch "
            f"{self._runner.max_batch})"
        )

    def close(self) -> None:
        self._runner.close()


def select_backend(
    bundle,
    prefer: str | None = None,
    *,
    threads: int | None = None,
    variant: str = "auto",
    engine_cache_dir: str | Path | None = None,
    providers: list[str] | None = None,
    variant_batch: int = 1,
    variant_budget_s: float = 3.0,
) -> Backend:
    """Choose the backend for a verified bundle: TensorRT, then onnxruntime.

    Args:
        bundle: a verified :class:`gapcast.edge.bundle.Bundle`.
        prefer: None or ``tensorrt`` (TensorRT first, then onnxruntime) or ``onnxruntime`` (only onnxruntime).
        threads: onnxruntime intra-op threads.
        variant: onnxruntime variant: ``auto`` (each variant that passed the export's accuracy gate timed here
            for at most ``variant_budget_s``, the fastest runs: :mod:`gapcast.edge.variant`), or a variant name
            from the card (``model.variant``: pinned, not timed).
        engine_cache_dir: TensorRT engine cache folder.
        providers: onnxruntime execution providers to use, best first.
        variant_batch: windows per timed run of the variant choice (the gateway's live batch).
        variant_budget_s: time bound of the variant choice, seconds.

    Returns:
        The chosen backend; ``backend.selection`` lists the backends passed over and why (also logged).

    Raises:
        BackendError: unknown ``prefer``/``variant``, or no backend can run the bundle.
    """
    if prefer not in (None, "tensorrt", "onnxruntime"):
        msg = f"unknown backend {prefer!r}; choose tensorrt or onnxruntime"
        raise BackendError(msg)
    order = ["onnxruntime"] if prefer == "onnxruntime" else list(BACKEND_ORDER)
    card = bundle.card
    n_calendar = len(card.calendar.get("features", [])) or int(card.inputs[2]["shape"][2])
    passed_over: list[tuple[str, str]] = []
    for name in order:
        try:
            if name == "tensorrt":
                from gapcast.edge.trt import load_cached_engine

                runner, meta = load_cached_engine(bundle, cache_dir=engine_cache_dir)
                backend: Backend = TrtBackend(runner, precision=str(meta.get("precision")), meta=meta)
            else:
                import onnxruntime as ort

                from gapcast.edge.variant import choose_variant

                def make(chosen: str) -> OrtBackend:
                    return OrtBackend(
                        bundle.variant_path(chosen),
                        lookback=card.lookback,
                        horizon=card.horizon,
                        n_channels=len(card.channels),
                        n_calendar=n_calendar,
                        precision=str(card.variants[chosen].get("precision", "fp32")),
                        threads=threads,
                        providers=providers,
                    )

                avail = providers or [p for p in ORT_PROVIDER_PREFERENCE if p in ort.get_available_providers()]
                # auto: every gated variant timed on live-shaped inputs here (gapcast.edge.variant); else pinned.
                backend, _ = choose_variant(
                    bundle, make, pinned=variant, batch=variant_batch, budget_s=variant_budget_s, provider=avail[0]
                )
        except (BackendError, ImportError) as exc:
            passed_over.append((name, str(exc)))
            log.info("backend %s not used: %s", name, exc)
            continue
        backend.selection = passed_over
        log.info("inference backend: %s", backend.describe())
        return backend
    msg = "no inference backend can run the bundle: " + "; ".join(f"{n}: {r}" for n, r in passed_over)
    raise BackendError(msg)
