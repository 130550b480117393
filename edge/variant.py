"""Gateway-side choice of the bundle's onnxruntime variant: time each one here, run the fastest that passed the gate.

The export machine is not the gateway: on one 2-core box ``int8_cpu`` measured 1.59x fp32's throughput at batch 64
in one run and 0.89x in another, so the bundle's variants are timed where they run. At start (and after a fleet
update switches in a new bundle) :func:`choose_variant` builds an onnxruntime backend for every variant the bundle
holds that

- runs on onnxruntime (the card's ``runtime`` says so: ``fp32`` and ``int8_cpu``; ``int8_qdq`` is TensorRT's),
- and passed the export's accuracy gate (``card.json`` ``int8_delta[name]``: imputation and forecast MAE within
  ``int8_delta.tolerance`` of fp32; ``fp32`` is the reference and always passes),

times them in interleaved rounds on live-shaped inputs (the bundle's golden windows tiled to the batch the gateway
will run: its station count) for a bounded time (``model.variant_budget_s``, default 3 s, loading included), logs
the timings and keeps the fastest by median batch time. An int8 variant must beat fp32 by ``min_speedup`` (1.05:
measurement noise) to be chosen; fp32 wins ties. ``model.variant = "fp32" | "int8_cpu" | ...`` in edge.toml pins a
variant and times nothing.

The policy (:func:`gated_candidates`, :func:`pick_fastest`) is pure; :func:`time_variants` is the thin runner and
takes its clock as an argument, so tests give it fake backends with known costs and a fake clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gapcast.edge import BackendError

__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_MIN_SPEEDUP",
    "VariantChoice",
    "VariantTiming",
    "choose_variant",
    "gated_candidates",
    "live_shaped_inputs",
    "pick_fastest",
    "time_variants",
    "variant_status",
]

log = logging.getLogger(__name__)

#: Seconds the whole choice may take by default (session loading and timed runs together).
DEFAULT_BUDGET_S = 3.0
#: Throughput ratio over fp32 a lower-precision variant needs to be chosen (run-to-run noise margin).
DEFAULT_MIN_SPEEDUP = 1.05
REFERENCE = "fp32"


@dataclass(frozen=True)
class VariantTiming:
    """The timed runs of one variant.

    Attributes:
        name: variant name (``fp32``, ``int8_cpu``).
        batch: windows per timed run.
        run_s: seconds of each timed run (the warm-up run is not in it).
    """

    name: str
    batch: int
    run_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Median seconds per batch (``inf`` when nothing was timed)."""
        return float(np.median(self.run_s)) if self.run_s else float("inf")

    @property
    def windows_per_s(self) -> float:
        """Throughput: windows per second at the median batch time."""
        m = self.median_s
        return self.batch / m if 0 < m < float("inf") else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": len(self.run_s),
            "median_ms": round(self.median_s * 1000.0, 3) if self.run_s else None,
            "windows_per_s": round(self.windows_per_s, 1),
        }


@dataclass(frozen=True)
class VariantChoice:
    """Which variant runs and why (logged at start and after a swap, published in the gateway status).

    Attributes:
        chosen: the variant that runs.
        how: ``pinned`` (``model.variant``), ``timed`` (fastest of several), ``only`` (one candidate, not timed).
        reason: one sentence for logs and the status.
        batch: windows per timed run (the live batch size).
        budget_s: the time bound, seconds.
        elapsed_s: seconds the choice took (loading + timing), by the clock it was given.
        timings: per-variant figures (:meth:`VariantTiming.to_dict`).
        skipped: variant -> why it was not a candidate (gate, runtime, load failure).
    """

    chosen: str
    how: str
    reason: str
    batch: int = 0
    budget_s: float = 0.0
    elapsed_s: float = 0.0
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_status(self) -> dict[str, Any]:
        """The ``variant`` object of the gateway status message."""
        out: dict[str, Any] = {"chosen": self.chosen, "how": self.how, "reason": self.reason}
        if self.how == "timed":
            out.update(batch=self.batch, budget_s=self.budget_s, elapsed_s=round(self.elapsed_s, 3))
            out["timings"] = self.timings
        if self.skipped:
            out["skipped"] = dict(sorted(self.skipped.items()))
        return out


def gated_candidates(card, *, provider: str = "CPUExecutionProvider") -> tuple[list[str], dict[str, str]]:
    """The variants worth timing on onnxruntime, from the card alone (pure).

    Args:
        card: the bundle's :class:`gapcast.edge.bundle.Card`.
        provider: the execution provider the sessions will use; a variant built for the CPU (its card
            ``runtime`` says ``(CPU)``) is left out on another provider.

    Returns:
        (candidates, ``fp32`` first then card order; skipped: variant -> reason). A variant other than fp32 is a
        candidate only when ``int8_delta[name]`` records both relative MAE deltas within ``int8_delta.tolerance``.
    """
    raw = card.raw if isinstance(getattr(card, "raw", None), Mapping) else {}
    gates = raw.get("int8_delta") or {}
    tolerance = gates.get("tolerance")
    candidates: list[str] = []
    skipped: dict[str, str] = {}
    for name in sorted(card.variants, key=lambda n: (n != REFERENCE, list(card.variants).index(n))):
        runtime = str(card.variants[name].get("runtime", "onnxruntime"))
        if "onnxruntime" not in runtime:
            skipped[name] = f"runtime {runtime}, not onnxruntime"
            continue
        if "(CPU)" in runtime and provider != "CPUExecutionProvider":
            skipped[name] = f"built for onnxruntime's CPU provider, sessions here use {provider}"
            continue
        if name == REFERENCE:
            candidates.append(name)
            continue
        gate = gates.get(name)
        if not isinstance(gate, Mapping) or tolerance is None:
            skipped[name] = "the card records no accuracy gate for it"
            continue
        deltas = [gate.get("imputation_rel_delta"), gate.get("forecast_rel_delta")]
        if any(not isinstance(d, int | float) or not d <= float(tolerance) for d in deltas):
            skipped[name] = f"failed the export's accuracy gate (relative MAE deltas {deltas}, limit {tolerance})"
            continue
        candidates.append(name)
    return candidates, skipped


def pick_fastest(timings: Mapping[str, VariantTiming], *, min_speedup: float = DEFAULT_MIN_SPEEDUP) -> str:
    """The fastest variant by median batch time (pure).

    fp32 is the reference: another variant is chosen only when its median batch time is at least ``min_speedup``
    times shorter than fp32's; among the others the shortest median wins, ties to the first in ``timings``.

    Raises:
        BackendError: nothing was timed.
    """
    timed = {n: t for n, t in timings.items() if t.run_s}
    if not timed:
        msg = "no variant completed a timed run"
        raise BackendError(msg)
    best = min(timed, key=lambda n: (timed[n].median_s, list(timed).index(n)))
    ref = timed.get(REFERENCE)
    if ref is not None and best != REFERENCE and ref.median_s < min_speedup * timed[best].median_s:
        return REFERENCE
    return best


def live_shaped_inputs(bundle, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the batch the gateway will run: the bundle's golden windows, tiled to ``batch``.

    Falls back to zeros with every value observed when the bundle has no golden file.

    Returns:
        values [B, L, C], observed [B, L, C], calendar [B, L+H, F], float32.
    """
    card = bundle.card
    golden = bundle.golden()
    if golden is not None and len(golden.get("values", ())):
        reps = -(-batch // len(golden["values"]))
        return tuple(  # type: ignore[return-value]
            np.ascontiguousarray(np.concatenate([golden[k]] * reps)[:batch], dtype=np.float32)
            for k in ("values", "observed", "calendar")
        )
    L, H, C = card.lookback, card.horizon, len(card.channels)
    F = len(card.calendar.get("features", [])) or int(card.inputs[2]["shape"][2])
    return (
        np.zeros((batch, L, C), np.float32),
        np.ones((batch, L, C), np.float32),
        np.zeros((batch, L + H, F), np.float32),
    )


def time_variants(
    backends: Mapping[str, Any],
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    budget_s: float,
    start_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, VariantTiming], dict[str, str]]:
    """Time ``backends`` in interleaved rounds until ``start_s + budget_s`` (the thin runner).

    Each backend gets one untimed warm-up run, then rounds of one timed run each, round-robin, so a slow moment of
    the machine hits every variant alike. Rounds stop once the clock passes the bound; every backend that ran its
    warm-up gets at least one timed run (the floor of the bound).

    Args:
        backends: variant name -> object with ``run(values, observed, calendar)``.
        inputs: (values [B, L, C], observed [B, L, C], calendar [B, L+H, F]) float32.
        budget_s: the time bound, seconds (counted from ``start_s``).
        start_s: clock reading when the choice started (session loading counts against the bound).
        clock: monotonic seconds (``time.perf_counter``; tests pass a fake).

    Returns:
        (name -> :class:`VariantTiming`, failed: name -> the error of a run that raised).
    """
    v, o, c = inputs
    runs: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    for name, backend in backends.items():  # warm-up: first-run allocations are not what a step costs
        try:
            backend.run(v, o, c)
            runs[name] = []
        except Exception as exc:  # any backend failure: the variant is not a candidate
            failed[name] = f"run failed: {exc}"
            log.warning("variant %s not timed: %s", name, exc)
    deadline = start_s + budget_s
    while runs:
        for name in list(runs):
            t0 = clock()
            try:
                backends[name].run(v, o, c)
            except Exception as exc:  # any backend failure: the variant is not a candidate
                failed[name] = f"run failed: {exc}"
                log.warning("variant %s dropped from the timing: %s", name, exc)
                del runs[name]
                continue
            runs[name].append(clock() - t0)
        if clock() >= deadline:
            break
    batch = len(v)
    return {n: VariantTiming(n, batch, tuple(r)) for n, r in runs.items()}, failed


def choose_variant(
    bundle,
    make_backend: Callable[[str], Any],
    *,
    pinned: str = "auto",
    batch: int = 1,
    budget_s: float = DEFAULT_BUDGET_S,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    provider: str = "CPUExecutionProvider",
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Any, VariantChoice]:
    """Choose and build the onnxruntime backend for a bundle (see the module docstring).

    Args:
        bundle: a verified :class:`gapcast.edge.bundle.Bundle`.
        make_backend: variant name -> a loaded backend (``run``, ``close``); raises :class:`BackendError` when
            the variant cannot load.
        pinned: ``auto`` (time the candidates) or a variant name (``model.variant``): built without timing.
        batch: windows per timed run: the gateway's live batch (its station count, capped by ``model.max_batch``).
        budget_s: the bound on the whole choice, seconds (loading + timing).
        min_speedup: see :func:`pick_fastest`.
        provider: the execution provider the sessions use (see :func:`gated_candidates`).
        clock: monotonic seconds.

    Returns:
        (the chosen backend, its :class:`VariantChoice`); the other backends are closed. The choice is also set
        as ``backend.variant_choice`` and logged with the timings.

    Raises:
        BackendError: the pinned variant is not in the bundle, or no candidate could load and run.
    """
    card = bundle.card
    if pinned != "auto":
        if pinned not in card.variants:
            why = (card.raw.get("excluded_variants") or {}).get(pinned)
            msg = f"the bundle has no {pinned!r} variant (has {sorted(card.variants)})"
            raise BackendError(msg + (f"; the export left it out: {why}" if why else ""))
        backend = make_backend(pinned)
        choice = VariantChoice(pinned, "pinned", f"model.variant = {pinned!r} in the config (not timed)")
        return _chosen(backend, choice), choice

    start_s = clock()
    candidates, skipped = gated_candidates(card, provider=provider)
    backends: dict[str, Any] = {}
    for name in candidates:
        try:
            backends[name] = make_backend(name)
        except BackendError as exc:
            skipped[name] = f"cannot load: {exc}"
            log.warning("variant %s not timed: %s", name, exc)
    if len(backends) == 1:
        (name, backend), = backends.items()
        choice = VariantChoice(name, "only", f"{name} is the only gated onnxruntime variant that loads", skipped=skipped)
        return _chosen(backend, choice), choice
    timings, failed = time_variants(backends, live_shaped_inputs(bundle, batch), budget_s=budget_s,
                                    start_s=start_s, clock=clock)  # fmt: skip
    skipped.update(failed)
    try:
        best = pick_fastest(timings, min_speedup=min_speedup)
    except BackendError:
        for b in backends.values():
            b.close()
        msg = "no onnxruntime variant of the bundle can run: " + "; ".join(f"{n}: {r}" for n, r in skipped.items())
        raise BackendError(msg) from None
    for name, b in backends.items():
        if name != best:
            b.close()
    figures = ", ".join(f"{n} {t.median_s * 1000:.2f} ms ({t.windows_per_s:.0f} windows/s)" for n, t in timings.items())
    elapsed = clock() - start_s
    reason = f"fastest at batch {batch} on this gateway: {figures}"
    if best == REFERENCE and len(timings) > 1:
        reason += f" (another variant must be >= {min_speedup:.2f}x faster than fp32)"
    choice = VariantChoice(
        best, "timed", reason, batch=batch, budget_s=budget_s, elapsed_s=elapsed,
        timings={n: t.to_dict() for n, t in timings.items()}, skipped=skipped,
    )  # fmt: skip
    return _chosen(backends[best], choice), choice


def _chosen(backend: Any, choice: VariantChoice) -> Any:
    backend.variant_choice = choice
    log.info("onnxruntime variant %s (%s): %s", choice.chosen, choice.how, choice.reason)
    for name, why in choice.skipped.items():
        log.info("variant %s not a candidate: %s", name, why)
    return backend


def variant_status(backend: Any) -> dict[str, Any] | None:
    """The ``variant`` object of the gateway status for the backend the agent runs (None: no variant choice).

    Looks through the fleet updater's guard (``backend.updater.active_backend``) to the model that runs now, so the
    status says what was chosen for the bundle that switched in last.
    """
    inner = getattr(getattr(backend, "updater", None), "active_backend", backend)
    choice = getattr(inner, "variant_choice", None)
    return choice.to_status() if isinstance(choice, VariantChoice) else None
