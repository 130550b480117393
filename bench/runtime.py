"""``gapcast bench runtime``: per-window latency, throughput, file size and peak memory of every way to run the model.

Engines measured: torch eager (the training checkpoint, when it can be found), and onnxruntime on the CPU execution
provider for every precision variant the bundle holds (``fp32``, ``int8_qdq``, ``int8_cpu``), through the gateway's
own backend (:class:`gapcast.edge.backends.OrtBackend`). Each engine runs in a fresh child process so its peak
resident memory (psutil, sampled every 5 ms) is its own; the inputs are real Beijing test-month windows
with their real observed masks (or the bundle's golden windows tiled, without the data).

For each batch size B: a few warm-up calls, then calls repeated until ``min_time_s`` and ``min_reps`` are both
reached; the median call time gives the per-window latency (median / B) and the throughput (B / median).
The figure that matters is the int8/fp32 throughput ratio at batch 64 (target >= 1.3x for the CPU variant, with the
accuracy delta recorded by the export's gate within 3 %).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RuntimeOptions", "load_bench_windows", "measure_engine", "run_runtime", "verify_local_bundle"]

log = logging.getLogger(__name__)

INT8_SPEEDUP_TARGET = 1.3
INT8_ACCURACY_TOLERANCE = 0.03


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime benchmark measures.

    Attributes:
        batches: batch sizes B.
        threads: CPU threads for torch and onnxruntime (the target machine class has 2 cores).
        min_time_s: measure each (engine, B) for at least this long, seconds.
        min_reps: and at least this many calls.
        warmup: untimed calls before measuring.
    """

    batches: tuple[int, ...] = (1, 16, 64, 256)
    threads: int = 2
    min_time_s: float = 3.0
    min_reps: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            msg = f"batch sizes must be >= 1, got {self.batches}"
            raise ValueError(msg)
        if self.threads < 1 or self.min_reps < 1 or self.min_time_s < 0:
            msg = "threads and min_reps must be >= 1, min_time_s >= 0"
            raise ValueError(msg)


def load_bench_windows(bundle, n: int, *, data=None, dataset=None) -> tuple[dict[str, np.ndarray], str]:
    """``n`` real windows for timing: Beijing test months with their real masks, else the golden windows tiled.

    Args:
        bundle: a verified :class:`gapcast.edge.bundle.Bundle`.
        n: windows wanted (the largest batch size).
        data: data root (None: ``$GAPCAST_DATA`` / cache).

    Returns:
        ({"values", "observed", "calendar"} float32 arrays with ``n`` rows, a sentence saying where they come from).

    Raises:
        BundleError: when neither the data nor golden windows are available.
    """
    from gapcast.edge import BundleError

    card = bundle.card
    try:
        from gapcast.train.data import Normalizer
        from gapcast.train.evaluate import eval_windows, spec_of_run
        from gapcast.train.loader import load_dataset

        spec = spec_of_run({"dataset": card.raw.get("dataset")}, dataset)
        if tuple(card.channel_names) != spec.channel_names:
            msg = f"the bundle's channels are not those of the dataset {spec.name}"
            raise ValueError(msg)
        series = load_dataset(spec, data)
        norm = Normalizer(mean=card.mean, std=card.std)
        per_station = max(1, -(-n // len(series)))
        tw = eval_windows(series, norm, lookback=card.lookback, horizon=card.horizon,
                          stride=max(1, 86400 // card.cadence_s), max_windows=per_station, spec=spec)
        L = card.lookback
        idx = np.resize(np.arange(len(tw)), n)
        return ({"values": tw.values[idx, :L], "observed": tw.observed[idx, :L], "calendar": tw.calendar[idx]},
                f"{min(n, len(tw))} real {spec.name} test-range windows with their real observed masks")
    except Exception as exc:  # no data folder, no pandas, other channels: fall back to the golden windows
        log.info("real windows unavailable (%s); using the bundle's golden windows", exc)
    golden = bundle.golden()
    if golden is None:
        msg = "no data and no golden windows in the bundle: nothing to time with"
        raise BundleError(msg)
    idx = np.resize(np.arange(len(golden["values"])), n)
    return ({k: golden[k][idx] for k in ("values", "observed", "calendar")},
            f"the bundle's {len(golden['values'])} golden windows, tiled")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _RssSampler:
    """Samples this process's RSS (psutil) every ``interval_s`` on a daemon thread; ``peak_mb`` is the highest seen.

    ``ru_maxrss`` is not used: on Linux a child started by fork + exec can report its parent's high-water mark.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self.peak_mb = self._proc.memory_info().rss / 2**20
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
        return self.peak_mb


def measure_engine(engine: dict[str, Any], inputs_path: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Time one engine (runs inside a fresh child process; also callable in-process for tests).

    Args:
        engine: ``{"kind": "torch", "checkpoint": path}`` or ``{"kind": "onnxruntime", "file": path,
            "lookback", "horizon", "n_channels", "n_calendar", "precision"}``.
        inputs_path: an ``.npz`` with ``values``, ``observed``, ``calendar`` (at least max(batches) rows).
        opts: :class:`RuntimeOptions` as a dict.

    Returns:
        ``{"per_batch": {B: {...}}, "rss_before_mb", "peak_rss_mb", "peak_rss_model_mb", "load_s", "describe"}``:
        RSS before loading the engine (interpreter, numpy, inputs), the peak while loading and running it
        (sampled every 5 ms), and their difference, MiB.
    """
    o = RuntimeOptions(**{**opts, "batches": tuple(opts["batches"])})
    with np.load(inputs_path) as z:
        v, m, c = (np.ascontiguousarray(z[k], dtype=np.float32) for k in ("values", "observed", "calendar"))
    rss_before = _rss_mb()
    sampler = _RssSampler()
    t0 = time.perf_counter()
    if engine["kind"] == "torch":
        import torch

        from gapcast.train.checkpoint import load_checkpoint

        torch.set_num_threads(o.threads)
        model, _ = load_checkpoint(engine["checkpoint"])
        describe = f"torch {torch.__version__} eager, CPU, {o.threads} threads"

        def run(b: int) -> None:
            with torch.inference_mode():
                model(torch.from_numpy(v[:b]), torch.from_numpy(m[:b]), torch.from_numpy(c[:b]))
    else:
        from gapcast.edge.backends import OrtBackend

        backend = OrtBackend(engine["file"], lookback=engine["lookback"], horizon=engine["horizon"],
                             n_channels=engine["n_channels"], n_calendar=engine["n_calendar"],
                             precision=engine["precision"], threads=o.threads, providers=["CPUExecutionProvider"])
        describe = backend.describe()

        def run(b: int) -> None:
            backend.run(v[:b], m[:b], c[:b])
    load_s = time.perf_counter() - t0
    per_batch: dict[str, Any] = {}
    for b in o.batches:
        for _ in range(o.warmup):
            run(b)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < o.min_reps or time.perf_counter() - start < o.min_time_s:
            t = time.perf_counter()
            run(b)
            times.append(time.perf_counter() - t)
        med = float(np.median(times))
        per_batch[str(b)] = {
            "calls": len(times),
            "batch_ms_median": med * 1e3,
            "batch_ms_p90": float(np.percentile(times, 90)) * 1e3,
            "window_ms": med * 1e3 / b,
            "windows_per_s": b / med,
        }
    peak = sampler.stop()
    return {"per_batch": per_batch, "rss_before_mb": rss_before, "peak_rss_mb": peak,
            "peak_rss_model_mb": peak - rss_before, "load_s": load_s, "describe": describe}


def _worker_main() -> None:
    """Child-process entry: read ``{"engine", "inputs", "opts"}`` JSON on stdin, print the result JSON on stdout."""
    import sys

    job = json.loads(sys.stdin.read())
    try:
        out = {"ok": measure_engine(job["engine"], job["inputs"], job["opts"])}
    except Exception as exc:  # reported to the parent, which prints it in the table
        out = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write("\n" + _RESULT_MARK + json.dumps(out) + "\n")


_RESULT_MARK = "GAPCAST-BENCH-RESULT "


def _in_child(engine: dict[str, Any], inputs_path: str, opts: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`measure_engine` in a fresh Python process (its own peak memory) and return its result."""
    import subprocess
    import sys

    job = json.dumps({"engine": engine, "inputs": inputs_path, "opts": opts})
    code = "from gapcast.bench.runtime import _worker_main; _worker_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=job, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            res = json.loads(line[len(_RESULT_MARK):])
            return res["ok"] if "ok" in res else {"error": res["error"]}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"error": f"the measuring process exited with code {proc.returncode}: {tail}"}


def _find_checkpoint(card_raw: dict[str, Any], run_dir: str | os.PathLike | None) -> Path | None:
    if run_dir:
        p = Path(run_dir)
        return p / "best.pt" if p.is_dir() else p
    run = card_raw.get("export", {}).get("run") or {}
    if run.get("dir"):
        p = Path(run["dir"]) / str(run.get("checkpoint", "best.pt"))
        if p.is_file():
            return p
    return None


def run_runtime(
    bundle_path: str | os.PathLike,
    *,
    run_dir: str | os.PathLike | None = None,
    trusted_keys: list | None = None,
    data=None,
    options: RuntimeOptions | None = None,
    progress: bool = True,
    dataset=None,
) -> dict[str, Any]:
    """Measure every engine of a bundle (and torch eager when the checkpoint is found).

    Args:
        bundle_path: the bundle folder or .tar.
        run_dir: the training run (or checkpoint file) for torch eager; default: the run recorded in the card.
        trusted_keys: public keys to verify the signature with; None verifies the files against the card and the
            signature against the card's own public key only (a local benchmark, not a gateway).
        data: data root for the timing windows.
        options: :class:`RuntimeOptions`.
        progress: tqdm over the engines.

    Returns:
        A JSON-ready dict: options, inputs, engines (per batch figures, sizes, memory), ratios, targets.
    """
    opts = options or RuntimeOptions()
    bundle = _verified(bundle_path, trusted_keys)
    card = bundle.card
    inputs, source = load_bench_windows(bundle, max(opts.batches), data=data, dataset=dataset)
    results = _measure(_engines(bundle, run_dir), inputs, opts, progress)
    ratios = _int8_ratios(results)
    delta = card.raw.get("int8_delta", {})
    targets = _runtime_targets(card, ratios, delta)
    return {
        "benchmark": "runtime",
        "protocol": __doc__.split("\n\n", 1)[1].replace("\n", " "),
        "bundle": str(bundle.path),
        "model": {"name": card.model_name, "version": card.model_version, "L": card.lookback, "H": card.horizon,
                  "C": len(card.channels), "config": card.raw.get("model", {}).get("config")},
        "options": asdict(opts),
        "cpu": _cpu_name(),
        "inputs": source,
        "engines": results,
        "int8_over_fp32_throughput": ratios,
        "int8_delta_from_card": delta,
        "excluded_variants": card.raw.get("excluded_variants", {}),
        "targets": targets,
    }


def verify_local_bundle(bundle_path):
    """A bundle for a local benchmark: verified under its card's own public key only (unsigned: the files against
    the card). A gateway trusts configured keys instead.

    Raises:
        BundleError: a file that does not match the card, or a bad signature.
    """
    from gapcast.edge.bundle import verify_bundle

    raw = json.loads((Path(bundle_path) / "card.json").read_text()) if Path(bundle_path).is_dir() else {}
    hexkey = (raw.get("signature") or {}).get("public_key_hex")
    return verify_bundle(bundle_path, [hexkey]) if hexkey else verify_bundle(bundle_path, require_signature=False)


def _verified(bundle_path, trusted_keys: list | None):
    """The bundle verified under ``trusted_keys``; with None, :func:`verify_local_bundle`.

    Raises:
        BundleError: a file that does not match the card, or a bad or untrusted signature.
    """
    from gapcast.edge.bundle import verify_bundle

    if trusted_keys is None:
        return verify_local_bundle(bundle_path)
    return verify_bundle(bundle_path, trusted_keys)


def _engines(bundle, run_dir) -> list[tuple[str, dict[str, Any], int | None]]:
    """The engines to time: torch eager when the checkpoint is found, then each onnxruntime variant of the bundle,
    as ``(label, engine spec for the child, file bytes)``; raises nothing."""
    card = bundle.card
    n_calendar = len(card.calendar.get("features", [])) or int(card.inputs[2]["shape"][2])
    engines: list[tuple[str, dict[str, Any], int | None]] = []
    ckpt = _find_checkpoint(card.raw, run_dir)
    if ckpt is not None and ckpt.is_file():
        engines.append(("torch eager fp32", {"kind": "torch", "checkpoint": str(ckpt)}, ckpt.stat().st_size))
    for name in ("fp32", "int8_qdq", "int8_cpu"):
        if name in card.variants:
            path = bundle.variant_path(name)
            engines.append((f"onnxruntime {name}", {
                "kind": "onnxruntime", "file": str(path), "lookback": card.lookback, "horizon": card.horizon,
                "n_channels": card.n_inputs, "n_calendar": n_calendar,
                "precision": str(card.variants[name].get("precision", name))}, path.stat().st_size))
    return engines


def _measure(engines: list, inputs: dict[str, np.ndarray], opts: RuntimeOptions, progress: bool) -> dict[str, Any]:
    """Time every engine in its own child process (:func:`_in_child`) on the same saved inputs; label -> figures
    (or ``error``) with the file and its size. Raises nothing (a failed child is recorded by :func:`_in_child`)."""
    from tqdm import tqdm

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gapcast-bench-") as tmp:
        inputs_path = os.path.join(tmp, "inputs.npz")
        np.savez(inputs_path, **inputs)
        for label, engine, size in tqdm(engines, desc="engines", disable=not progress):
            per_engine_timeout = 120 + 10 * len(opts.batches) * (opts.min_time_s + 5)
            res = _in_child(engine, inputs_path, asdict(opts), per_engine_timeout)
            res["file_bytes"] = size
            res["file"] = engine.get("file") or engine.get("checkpoint")
            results[label] = res
    return results


def _int8_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each int8 engine's throughput over onnxruntime fp32, per batch size (label -> {batch: ratio}); pure."""
    ratios: dict[str, Any] = {}
    ref = results.get("onnxruntime fp32", {}).get("per_batch")
    for label, res in results.items():
        if "int8" not in label or "per_batch" not in res or not ref:
            continue
        ratios[label] = {b: res["per_batch"][b]["windows_per_s"] / ref[b]["windows_per_s"] for b in ref
                         if b in res["per_batch"]}
    return ratios


def _runtime_targets(card, ratios: dict[str, Any], delta: dict[str, Any]) -> list[dict[str, Any]]:
    """The int8 targets (throughput >= the speed-up target at batch 64, accuracy from the card's export gate),
    with a missed entry first when the bundle has no CPU int8 variant; pure."""
    targets = []
    for variant in ("int8_cpu", "int8_qdq"):
        label = f"onnxruntime {variant}"
        r = ratios.get(label, {}).get("64")
        if r is None:
            continue
        d = delta.get(variant, {})
        acc = max(abs(d.get("imputation_rel_delta", float("nan"))), abs(d.get("forecast_rel_delta", float("nan"))))
        targets.append({
            "target": f"{variant} throughput >= {INT8_SPEEDUP_TARGET}x fp32 at batch 64"
            + (" (the CPU variant: this target applies)" if variant == "int8_cpu" else " (TensorRT variant: "
               "onnxruntime CPU runs its QDQ nodes as written; shown for completeness)"),
            "measured": r, "goal": INT8_SPEEDUP_TARGET, "met": bool(r >= INT8_SPEEDUP_TARGET),
            "margin": r - INT8_SPEEDUP_TARGET,
        })
        targets.append({
            "target": f"{variant} accuracy within {INT8_ACCURACY_TOLERANCE:.0%} of fp32 (export gate, validation)",
            "measured": acc, "goal": INT8_ACCURACY_TOLERANCE, "met": bool(acc <= INT8_ACCURACY_TOLERANCE),
            "margin": INT8_ACCURACY_TOLERANCE - acc,
        })
    if "int8_cpu" not in card.variants:
        why = card.raw.get("excluded_variants", {}).get("int8_cpu", "not in the bundle")
        targets.insert(0, {
            "target": f"int8 CPU variant throughput >= {INT8_SPEEDUP_TARGET}x fp32 at batch 64",
            "measured": None, "goal": INT8_SPEEDUP_TARGET, "met": False, "margin": None,
            "margin_text": f"no int8 CPU variant in the bundle: {why}",
        })
    return targets


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{os.cpu_count()} logical CPUs"
