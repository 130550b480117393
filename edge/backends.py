"""Inference backends on the gateway: one interface, :class:`Backend`, over TensorRT, onnxruntime, the interpolation
fallback and the fleet updater's guarded backend (docs/ARCHITECTURE.md, "Contracts").

Every backend takes a batch of B station windows and returns float32 numpy arrays::

    imputed, forecast = backend.run(values, observed, calendar)
    # values, observed: [B, L, C] float32 (normalised; observed 1/0), calendar: [B, L+H, F] float32
    # imputed: [B, L, C], forecast: [B, H, C], normalised

:func:`select_backend` tries TensorRT (a cached engine that passed the bundle's golden check, see
:mod:`gapcast.edge.trt`), then onnxruntime with the best execution provider available, and reports which one runs
(``backend.name``, ``backend.describe()``) and why the others were passed over (``backend.selection``). With
``build_engine=True`` (fleet updates stage this way) a TensorRT engine is built and golden-checked when none is
cached, and a build that fails at every precision raises :class:`EngineBuildFailed` instead of moving to the CPU.
The plain-interpolation fallback (``gapcast.edge.agent.InterpolationBackend``) is the agent's, used when no model
runs at all.
"""

from __future__ import annotations

import json
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
    "EngineBuildFailed",
    "ModelBackend",
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
    """The one inference interface the agent runs (docs/ARCHITECTURE.md, "Contracts"): every implementation —
    onnxruntime, TensorRT, the interpolation fallback, the fleet updater's guarded backend — declares it, and the
    agent calls nothing else. ``tests/edge/test_backend_contract.py`` runs one contract suite over all of them.

    Attributes:
        name: ``tensorrt``, ``onnxruntime``, ``interpolation``, ... (the status message's ``backend``).
        precision: ``fp32``, ``fp16`` or ``int8`` (``fp32`` for a backend without a model).
    """

    name: str = "backend"
    precision: str = "fp32"

    @abstractmethod
    def run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fill and forecast a batch of windows.

        Args:
            values: [B, L, C] float32, normalised; anything where ``observed`` is 0.
            observed: [B, L, C] float32, 1 = observed.
            calendar: [B, L+H, F] float32 calendar features of the past and future steps.

        Returns:
            (imputed [B, L, C], forecast [B, H, C]) float32, normalised.

        Raises:
            BackendError: wrong shapes, non-finite observed values, or a failed run (the agent falls back to
                interpolation for that batch and counts it).
        """

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and the gateway status: backend, precision, device."""

    @property
    def model_version(self) -> int | None:
        """Version of the model serving the next batch; None = the card the agent was started with (a backend
        whose model can change under it, the fleet updater's, says which one serves)."""
        return None

    def step_boundary(self) -> None:  # noqa: B027 - optional hook, most backends have nothing to do between steps
        """Called by the agent between two steps, before a round's inference (the fleet updater switches models
        here). Runs on the step thread; must return quickly."""

    def info(self) -> dict[str, Any]:
        """What the status and the retained model report say about this backend: name, precision, description
        (a TensorRT backend adds its engine's build time and cache key)."""
        return {"name": self.name, "precision": self.precision, "describe": self.describe()}

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to free
        """Release resources (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelBackend(Backend):
    """A backend that runs the bundle's model: validates the batch's shapes against the card, zeroes unobserved
    cells, then hands contiguous float32 arrays to :meth:`_run`.

    Attributes:
        lookback, horizon, n_channels, n_calendar: L, H, C, F.
        selection: ``(backend, reason)`` for each backend passed over before this one was chosen.
    """

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
        """See :meth:`Backend.run`; unobserved cells are zeroed here (NaN allowed there)."""
        v, o, c = self._validate(values, observed, calendar)
        imp, fc = self._run(v, o, c)
        return np.asarray(imp, dtype=np.float32), np.asarray(fc, dtype=np.float32)

    @abstractmethod
    def _run(self, values: np.ndarray, observed: np.ndarray, calendar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backend-specific run on validated, contiguous float32 arrays."""


class OrtBackend(ModelBackend):
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
        # Memory pattern planning off (issue 17): it pre-plans one arena block per input shape it sees, and the
        # agent's batches vary (a ragged last batch every round), so the plans pile up. Measured on a tiny bundle at
        # batch 256: peak RSS 245 -> 165 MiB, windows/s unchanged within noise; the arena itself stays on (off it
        # was slower and no smaller). Figures and command: README "Agent performance".
        opts.enable_mem_pattern = False
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

    def close(self) -> None:
        """Drop the session (its arena goes with it): a variant timed and not chosen holds no memory afterwards."""
        self._session = None

    def describe(self) -> str:
        threads = self.threads if self.threads else "default"
        return (
            f"onnxruntime {self.onnxruntime_version} {self.providers[0]} ({self.precision}, "
            f"{self.model_path.name}, threads {threads})"
        )


class TrtBackend(ModelBackend):
    """A TensorRT engine (see :mod:`gapcast.edge.trt`) behind the backend interface.

    Args:
        runner: a :class:`gapcast.edge.trt.TrtRunner`.
        precision: the engine's precision.
        meta: the engine's cache metadata (reported by :meth:`describe`).
        build_s: how long building and checking the engine took here, seconds (None: taken from the cache as
            it was, no build).
    """

    name = "tensorrt"

    def __init__(self, runner, *, precision: str, meta: dict[str, Any] | None = None, build_s: float | None = None):
        super().__init__(runner.lookback, runner.horizon, runner.n_channels, runner.n_calendar)
        self._runner = runner
        self.precision = precision
        self.meta = meta or {}
        self.build_s = build_s

    def _run(self, values, observed, calendar):
        return self._runner.run(values, observed, calendar)

    def describe(self) -> str:
        m = self.meta
        return (
            f"TensorRT {m.get('trt_version', '?')} on {m.get('gpu', '?')} ({self.precision}, max batch "
            f"{self._runner.max_batch})"
        )

    def info(self) -> dict[str, Any]:
        """:meth:`Backend.info` plus ``engine_build_s`` (None: from the cache), the requested precision and the
        golden figures the engine passed."""
        return {
            **super().info(),
            "engine_build_s": None if self.build_s is None else round(self.build_s, 3),
            "requested_precision": self.meta.get("requested"),
            "golden": self.meta.get("golden"),
        }

    def close(self) -> None:
        self._runner.close()


class EngineBuildFailed(BackendError):
    """TensorRT is present but no engine passed its golden check at any precision (int8 -> fp16 -> fp32): the
    bundle must not silently move to the CPU (issue 14). The message lists every precision tried and why."""


def _n_calendar(card) -> int:
    return len(card.calendar.get("features", [])) or int(card.inputs[2]["shape"][2])


def _tensorrt_backend(
    bundle, *, engine_cache_dir: str | Path | None, build: bool, precision: str, max_batch: int
) -> Backend:
    """A TensorRT backend: a cached engine that passed its golden check, or (``build``) one built and checked now.

    Raises:
        gapcast.edge.trt.TensorRTUnavailable: no TensorRT, CUDA runtime or GPU (the caller moves on).
        EngineBuildFailed: ``build`` and no precision passed.
        BackendError: no cached engine (without ``build``).
    """
    from gapcast.edge import trt

    if not build:
        runner, meta = trt.load_cached_engine(bundle, cache_dir=engine_cache_dir)
        return TrtBackend(runner, precision=str(meta.get("precision")), meta=meta)
    try:
        result = trt.build_and_check(bundle, precision, max_batch=max_batch, cache_dir=engine_cache_dir)
    except trt.TensorRTUnavailable:
        raise
    except BackendError as exc:
        raise EngineBuildFailed(f"TensorRT is present but no engine could be used: {exc}") from exc
    log.info(
        "TensorRT %s engine for %s v%d %s in %.1f s (requested %s)",
        result.precision, bundle.card.model_name, bundle.card.model_version,
        "taken from the cache" if result.cached else "built and golden-checked", result.build_s, precision,
    )  # fmt: skip
    meta = json.loads(result.engine_path.with_suffix(".json").read_text())
    runner = trt.TrtRunner(result.engine_path.read_bytes())
    return TrtBackend(runner, precision=result.precision, meta=meta, build_s=None if result.cached else result.build_s)


def _ort_backend(
    bundle, *, variant: str, threads: int | None, providers: list[str] | None, batch: int = 1, budget_s: float = 3.0
) -> Backend:
    """An onnxruntime backend for the bundle's ``variant``: ``auto`` times each variant that passed the export's
    accuracy gate on live-shaped inputs for at most ``budget_s`` seconds and keeps the fastest
    (:mod:`gapcast.edge.variant`); a variant name pins it.

    Raises:
        BackendError: onnxruntime missing, the variant absent, or the model does not load.
    """
    import onnxruntime as ort

    from gapcast.edge.variant import choose_variant

    card = bundle.card

    def make(chosen: str) -> OrtBackend:
        if chosen not in card.variants:
            msg = f"the bundle has no {chosen!r} variant (has {sorted(card.variants)})"
            raise BackendError(msg)
        return OrtBackend(
            bundle.variant_path(chosen),
            lookback=card.lookback,
            horizon=card.horizon,
            n_channels=card.n_inputs,
            n_calendar=_n_calendar(card),
            precision=str(card.variants[chosen].get("precision", "fp32")),
            threads=threads,
            providers=providers,
        )

    avail = providers or [p for p in ORT_PROVIDER_PREFERENCE if p in ort.get_available_providers()]
    backend, _ = choose_variant(bundle, make, pinned=variant, batch=batch, budget_s=budget_s, provider=avail[0])
    return backend


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
    build_engine: bool = False,
    engine_precision: str = "int8",
    engine_max_batch: int = 64,
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
        build_engine: build (and golden-check) a TensorRT engine when none is cached, with the precision policy of
            ``gapcast edge build-engine`` (``engine_precision`` first, then int8 -> fp16 -> fp32, each fallback
            logged). The fleet updater stages updates this way, off the step thread.
        engine_precision: the precision asked for first when building.
        engine_max_batch: the built engine's largest batch.

    Returns:
        The chosen backend; ``backend.selection`` lists the backends passed over and why (also logged).

    Raises:
        BackendError: unknown ``prefer``/``variant``, or no backend can run the bundle.
        EngineBuildFailed: ``build_engine``, TensorRT present, and no engine passed at any precision (never a silent
            move to onnxruntime).
    """
    if prefer not in (None, "tensorrt", "onnxruntime"):
        msg = f"unknown backend {prefer!r}; choose tensorrt or onnxruntime"
        raise BackendError(msg)
    order = ["onnxruntime"] if prefer == "onnxruntime" else list(BACKEND_ORDER)
    passed_over: list[tuple[str, str]] = []
    for name in order:
        try:
            if name == "tensorrt":
                backend = _tensorrt_backend(
                    bundle, engine_cache_dir=engine_cache_dir, build=build_engine, precision=engine_precision,
                    max_batch=engine_max_batch,
                )  # fmt: skip
            else:
                backend = _ort_backend(
                    bundle, variant=variant, threads=threads, providers=providers, batch=variant_batch,
                    budget_s=variant_budget_s,
                )  # fmt: skip
        except EngineBuildFailed:
            raise
        except (BackendError, ImportError) as exc:
            passed_over.append((name, str(exc)))
            log.info("backend %s not used: %s", name, exc)
            continue
        backend.selection = passed_over
        log.info("inference backend: %s", backend.describe())
        return backend
    msg = "no inference backend can run the bundle: " + "; ".join(f"{n}: {r}" for n, r in passed_over)
    raise BackendError(msg)
