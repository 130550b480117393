"""One prepared GPU check: run on whatever NVIDIA machine this is everything it can run, say what it could not.

``deploy/jetson/gpu-check.sh`` (or ``python -m gapcast.tools.gpucheck --out DIR``) runs, each part only where the
machine has what it needs, and within a time bound (default 450 s, so the whole script stays under 8 minutes):

1. ``environment``: nvidia-smi, the L4T release, torch + CUDA, TensorRT's Python binding, onnxruntime providers;
2. ``pytest_gpu``: ``pytest -m gpu`` (needs a CUDA device);
3. ``bundle``: a freshly exported tiny bundle (:mod:`gapcast.tools.tinybundle`: untrained seeded ConFill, real
   Beijing windows, the release export pipeline), or ``--bundle PATH``;
4. ``tensorrt_fp32`` / ``tensorrt_fp16`` / ``tensorrt_int8``: engines built with the golden check and the precision
   fallback of ``gapcast edge build-engine`` (needs ``import tensorrt``);
5. ``ort_cpu``, ``ort_cuda``, ``ort_tensorrt``: onnxruntime with the CPU / CUDA / TensorRT execution providers, each
   checked against the golden outputs (the GPU ones only where this onnxruntime build offers them);
6. ``torch_cuda_train``: a few training steps of the tiny ConFill on CUDA inside DistributedDataParallel on NCCL
   with one process (an all-reduce checked on the way);
7. ``timing``: every engine and provider that ran, at batch 1 / 64 / 256, against onnxruntime CPU.

It installs nothing and needs no network. It writes ``gpu-check.json`` and ``gpu-check.md`` and prints one
``not available here: PART: why`` line per part it could not run. Exit status 0 unless a part that ran failed
(a golden check, a training step, a test), then 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BATCHES",
    "PARTS",
    "PartResult",
    "Report",
    "main",
    "run_checks",
    "time_runner",
]

log = logging.getLogger(__name__)

PARTS = (
    "environment",
    "pytest_gpu",
    "bundle",
    "tensorrt_fp32",
    "tensorrt_fp16",
    "tensorrt_int8",
    "ort_cpu",
    "ort_cuda",
    "ort_tensorrt",
    "torch_cuda_train",
    "timing",
)
BATCHES = (1, 64, 256)
OK, FAILED, NOT_AVAILABLE = "ok", "failed", "not available"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class PartResult:
    """One part of the check.

    Attributes:
        name: one of :data:`PARTS`.
        status: ``ok``, ``failed`` or ``not available``.
        detail: one sentence: what ran and what came out, or why it could not run.
        seconds: wall time of the part.
        figures: numbers worth keeping (versions, golden differences, losses).
    """

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Everything one run found, in :data:`PARTS` order.

    Attributes:
        host: machine name and platform.
        parts: the parts' results.
        timings: rows ``{"backend", "batch", "median_ms", "windows_per_s", "speedup_vs_ort_cpu"}``.
        started: RFC 3339 UTC.
        seconds: total wall time.
    """

    host: str
    parts: list[PartResult] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0

    def part(self, name: str) -> PartResult | None:
        return next((p for p in self.parts if p.name == name), None)

    def not_available(self) -> list[str]:
        """``not available here: PART: why`` for each part that could not run."""
        return [f"not available here: {p.name}: {p.detail}" for p in self.parts if p.status == NOT_AVAILABLE]

    def exit_code(self) -> int:
        """0 unless a part that ran failed."""
        return 1 if any(p.status == FAILED for p in self.parts) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "gapcast/gpu-check/1",
            "host": self.host,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "parts": [asdict(p) for p in self.parts],
            "timings": self.timings,
            "not_available": self.not_available(),
            "exit_code": self.exit_code(),
        }

    def to_markdown(self) -> str:
        """The report as Markdown: a parts table, the timing table, the not-available lines."""
        lines = [f"# gapcast gpu-check on {self.host}", "", f"Started {self.started}, {self.seconds:.0f} s.", ""]
        lines += ["| part | status | s | detail |", "|---|---|---:|---|"]
        for p in self.parts:
            detail = p.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {p.name} | {p.status} | {p.seconds:.1f} | {detail} |")
        if self.timings:
            lines += ["", "| backend | batch | ms per batch | windows/s | vs onnxruntime CPU |", "|---|---:|---:|---:|---:|"]
            for r in self.timings:
                sp = r.get("speedup_vs_ort_cpu")
                sp_s = f"{sp:.2f}x" if isinstance(sp, int | float) else "-"
                lines.append(
                    f"| {r['backend']} | {r['batch']} | {r['median_ms']:.3f} | {r['windows_per_s']:.0f} | {sp_s} |"
                )
        na = self.not_available()
        if na:
            lines += ["", *[f"- {x}" for x in na]]
        return "\n".join(lines) + "\n"


class Deadline:
    """Seconds left of the run's time bound (``clock`` is monotonic seconds)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.end = clock, clock() + budget_s

    def left(self) -> float:
        return self.end - self.clock()


def time_runner(
    run: Callable[[np.ndarray, np.ndarray, np.ndarray], Any],
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    min_time_s: float = 0.5,
    max_runs: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds per call of ``run(values, observed, calendar)`` after one warm-up call.

    Runs until ``min_time_s`` has passed (at least 3 calls, at most ``max_runs``).
    """
    run(*inputs)
    times: list[float] = []
    start = clock()
    while len(times) < max_runs and (len(times) < 3 or clock() - start < min_time_s):
        t0 = clock()
        run(*inputs)
        times.append(clock() - t0)
    return float(np.median(times))


def _tile(golden: dict[str, np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    reps = -(-batch // len(golden["values"]))
    return tuple(  # type: ignore[return-value]
        np.ascontiguousarray(np.concatenate([golden[k]] * reps)[:batch], dtype=np.float32)
        for k in ("values", "observed", "calendar")
    )


def _part(name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> PartResult:
    """Run one part; an unexpected exception is a failure with the reason, never a crash of the whole check."""
    t0 = time.monotonic()
    try:
        status, detail, figures = fn()
    except Exception as exc:  # any error of a part is reported, the others still run
        log.exception("part %s raised", name)
        status, detail, figures = FAILED, f"{type(exc).__name__}: {exc}", {}
    return PartResult(name, status, detail, time.monotonic() - t0, figures)


def _probe() -> dict[str, Any]:
    """What this machine has (no side effects beyond running nvidia-smi)."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine()}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"failed: {exc}"
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        env["l4t"] = tegra.read_text(errors="replace").splitlines()[0] if tegra.read_text(errors="replace") else ""
    env["torch"] = env["cuda"] = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["cuda_device"] = torch.cuda.get_device_name(0)
            env["nccl"] = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    env["tensorrt"] = None
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # ImportError, or a binding that fails to load its libraries
        env["tensorrt_error"] = f"{type(exc).__name__}: {exc}"
    env["onnxruntime"], env["ort_providers"] = None, []
    try:
        import onnxruntime as ort

        env["onnxruntime"], env["ort_providers"] = ort.__version__, list(ort.get_available_providers())
    except ImportError as exc:
        env["onnxruntime_error"] = str(exc)
    return env


class _Checks:
    """The parts of :func:`run_checks`, each a method returning ``(status, detail, figures)``, and what they share:
    the machine's environment, the bundle, the time bound and the runners the timing table measures."""

    def __init__(self, out: Path, bundle_path: Path | None, deadline: Deadline, batches: tuple[int, ...],
                 min_time_s: float, train_steps: int, probe: Callable[[], dict[str, Any]], report: Report) -> None:
        self.out, self.bundle_path, self.deadline, self.batches = out, bundle_path, deadline, batches
        self.min_time_s, self.train_steps, self.probe, self.report = min_time_s, train_steps, probe, report
        self.env: dict[str, Any] = {}
        self.bundle = None
        self.runners: dict[str, Callable] = {}  # backend label -> run(values, observed, calendar)
        self.closers: list[Callable[[], None]] = []

    @property
    def cuda(self) -> bool:
        return bool(self.env.get("cuda"))

    @property
    def trt(self) -> bool:
        return bool(self.env.get("tensorrt"))

    def environment(self):
        self.env.update(self.probe())
        has = [f"{k} {self.env[k]}" for k in ("torch", "cuda", "tensorrt", "onnxruntime") if self.env.get(k)]
        return OK, ", ".join(has) + f"; onnxruntime providers {self.env.get('ort_providers')}", dict(self.env)

    def pytest_gpu(self):
        if not (self.cuda or self.trt):
            return NOT_AVAILABLE, "no CUDA device (torch.cuda) and no TensorRT binding", {}
        if not (REPO / "tests").is_dir() or importlib.util.find_spec("pytest") is None:
            return NOT_AVAILABLE, "no tests/ folder or pytest in this installation (run from a checkout)", {}
        limit = max(30.0, min(180.0, self.deadline.left() - 200.0))
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPO / "tests")]
        try:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return FAILED, f"pytest -m gpu ran past {limit:.0f} s", {}
        tail = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        # 5: no test collected (every gpu test deselected) is not a failure of the machine.
        status = OK if res.returncode in (0, 5) else FAILED
        return status, f"pytest -m gpu: {tail} (exit {res.returncode})", {"exit": res.returncode}

    def bundle_part(self):
        from gapcast.edge.bundle import verify_bundle

        if self.bundle_path is not None:
            self.bundle = verify_bundle(self.bundle_path, require_signature=False)
            return OK, f"given: {self.bundle_path}", {}
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnx") is None:
            return NOT_AVAILABLE, "a fresh export needs torch and onnx (pip install 'gapcast[train]'); or --bundle", {}
        from gapcast.tools.tinybundle import build_tiny_bundle

        t0 = time.monotonic()
        res = build_tiny_bundle(self.out / "bundle", overwrite=True)
        self.bundle = verify_bundle(res.path, require_signature=False)
        card = self.bundle.card
        return OK, f"fresh tiny export in {time.monotonic() - t0:.1f} s: variants {sorted(card.variants)}", {
            "variants": sorted(card.variants),
            "excluded": card.raw.get("excluded_variants", {}),
        }

    def engine(self, precision: str):
        if not self.trt:
            return NOT_AVAILABLE, f"TensorRT's Python binding does not import ({self.env.get('tensorrt_error')})", {}
        if self.bundle is None:
            return NOT_AVAILABLE, "no bundle (see the bundle part)", {}
        if self.deadline.left() < 60:
            return NOT_AVAILABLE, "time bound reached before this engine build", {}
        from gapcast.edge.trt import TrtRunner, build_and_check

        t0 = time.monotonic()
        built = build_and_check(self.bundle, precision, max_batch=max(self.batches), cache_dir=self.out / "engines",
                                rebuild=True)
        secs = time.monotonic() - t0
        runner = TrtRunner(built.engine_path.read_bytes())
        self.runners[f"TensorRT {built.precision}"] = runner.run
        self.closers.append(runner.close)
        fell = "" if built.precision == precision else f" (fell back: {built.attempts})"
        return OK, f"built {built.precision} in {secs:.0f} s, {built.golden.describe()}{fell}", {
            "precision": built.precision,
            "build_s": round(secs, 1),
            "golden_max_abs": built.golden.max_abs,
            "attempts": [list(a) for a in built.attempts],
        }

    def ort_part(self, provider: str):
        providers = self.env.get("ort_providers") or []
        if provider not in providers:
            return NOT_AVAILABLE, f"this onnxruntime build has no {provider} (has {providers})", {}
        if self.bundle is None:
            return NOT_AVAILABLE, "no bundle (see the bundle part)", {}
        from gapcast.edge.backends import OrtBackend
        from gapcast.edge.trt import compare_golden

        card = self.bundle.card
        g = self.bundle.golden()
        backend = OrtBackend(
            self.bundle.variant_path("fp32"), lookback=card.lookback, horizon=card.horizon,
            n_channels=card.n_inputs, n_calendar=int(g["calendar"].shape[-1]), providers=[provider],
        )  # fmt: skip
        if backend.providers[0] != provider:
            return FAILED, f"asked for {provider}, the session runs {backend.providers}", {}
        imp, fc = backend.run(g["values"], g["observed"], g["calendar"])
        prec = "fp16" if provider == "TensorrtExecutionProvider" else "fp32"  # ORT-TRT may pick fp16 tactics
        check = compare_golden(imp, fc, g, prec)
        self.runners[f"onnxruntime {provider.removesuffix('ExecutionProvider')}"] = backend.run
        return (OK if check.ok else FAILED), check.describe(), {"golden_max_abs": check.max_abs}

    def train_part(self):
        """torch CUDA training on NCCL with one process."""
        if not self.cuda:
            why = "torch is not installed" if not self.env.get("torch") else "torch sees no CUDA device"
            return NOT_AVAILABLE, why, {}
        if not self.env.get("nccl"):
            return NOT_AVAILABLE, "this torch build has no NCCL", {}
        return _train_steps(self.train_steps)

    def timing_part(self):
        if self.bundle is None or "onnxruntime CPU" not in self.runners:
            return NOT_AVAILABLE, "needs the bundle and onnxruntime CPU (the baseline)", {}
        g = self.bundle.golden()
        cpu_ms: dict[int, float] = {}
        skipped = []
        for label, run in self.runners.items():
            for b in self.batches:
                if self.deadline.left() < 15:
                    skipped.append(f"{label} b{b}")
                    continue
                ms = time_runner(run, _tile(g, b), min_time_s=self.min_time_s) * 1000.0
                if label == "onnxruntime CPU":
                    cpu_ms[b] = ms
                self.report.timings.append({
                    "backend": label, "batch": b, "median_ms": round(ms, 3),
                    "windows_per_s": round(b / (ms / 1000.0), 1),
                    "speedup_vs_ort_cpu": round(cpu_ms[b] / ms, 2) if b in cpu_ms else None,
                })  # fmt: skip
        detail = f"{len(self.report.timings)} figures ({len(self.runners)} backends x batches {list(self.batches)})"
        if skipped:
            detail += f"; time bound reached, not timed: {', '.join(skipped)}"
        return OK, detail, {}


def run_checks(
    out: Path,
    *,
    bundle_path: Path | None = None,
    budget_s: float = 450.0,
    batches: tuple[int, ...] = BATCHES,
    min_time_s: float = 0.5,
    train_steps: int = 5,
    probe: Callable[[], dict[str, Any]] = _probe,
) -> Report:
    """Run every part this machine can run and write ``gpu-check.json`` and ``gpu-check.md`` into ``out``.

    Args:
        out: report folder (created).
        bundle_path: a bundle to use instead of exporting a fresh tiny one (an unsigned bundle is fine here).
        budget_s: time bound of the whole run, seconds; a part that would start with less than its share left is
            reported ``not available`` with that reason.
        batches: batch sizes of the timing table.
        min_time_s: seconds each timing runs at least.
        train_steps: torch CUDA training steps.
        probe: returns what the machine has (tests pass a fake).

    Returns:
        The :class:`Report` (also written).
    """
    t_start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(host=f"{socket.gethostname()} ({platform.machine()})", started=_now())
    c = _Checks(out, bundle_path, Deadline(budget_s), batches, min_time_s, train_steps, probe, report)
    parts: list[tuple[str, Callable]] = [("environment", c.environment), ("pytest_gpu", c.pytest_gpu),
                                         ("bundle", c.bundle_part)]
    parts += [(f"tensorrt_{p}", functools.partial(c.engine, p)) for p in ("fp32", "fp16", "int8")]
    parts += [(name, functools.partial(c.ort_part, provider)) for name, provider in (
        ("ort_cpu", "CPUExecutionProvider"),
        ("ort_cuda", "CUDAExecutionProvider"),
        ("ort_tensorrt", "TensorrtExecutionProvider"),
    )]
    parts += [("torch_cuda_train", c.train_part), ("timing", c.timing_part)]
    for name, fn in parts:  # in order: each part sees what the earlier ones found (environment, bundle, runners)
        report.parts.append(_part(name, fn))
    for close in c.closers:
        close()
    report.seconds = time.monotonic() - t_start
    (out / "gpu-check.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / "gpu-check.md").write_text(report.to_markdown())
    return report


def _train_steps(steps: int) -> tuple[str, str, dict[str, Any]]:
    """A few AdamW steps of the tiny ConFill on CUDA in DDP over NCCL (world size 1); checks an all-reduce."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gapcast.tools.tinybundle import tiny_config
    from gapcast.train.model import ConFill

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        dev = torch.device("cuda", 0)
        x = torch.arange(4.0, device=dev)
        dist.all_reduce(x)
        if x.tolist() != [0.0, 1.0, 2.0, 3.0]:
            return FAILED, f"NCCL all_reduce over one process changed the tensor: {x.tolist()}", {}
        cfg = tiny_config()
        torch.manual_seed(0)
        model = DistributedDataParallel(ConFill(cfg).to(dev), device_ids=[0])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        B, L, H, C, F = 32, cfg.lookback, cfg.horizon, cfg.n_channels, cfg.n_calendar
        g = torch.Generator(device="cpu").manual_seed(0)
        values = torch.randn(B, L, C, generator=g).to(dev)
        target = torch.randn(B, H, C, generator=g).to(dev)
        observed = (torch.rand(B, L, C, generator=g) > 0.2).float().to(dev)
        calendar = torch.randn(B, L + H, F, generator=g).to(dev)
        losses = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            imputed, forecast = model(values * observed, observed, calendar)
            loss = torch.nn.functional.mse_loss(forecast, target) + torch.nn.functional.mse_loss(
                imputed * observed, values * observed
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / steps * 1000.0
        finite = all(np.isfinite(losses))
        status = OK if finite and losses[-1] < losses[0] else FAILED
        return status, (
            f"{steps} DDP/NCCL steps at batch {B} on {torch.cuda.get_device_name(0)}: loss {losses[0]:.4f} -> "
            f"{losses[-1]:.4f}, {ms:.1f} ms/step"
        ), {"losses": losses, "ms_per_step": round(ms, 2)}
    finally:
        dist.destroy_process_group()


def _now() -> str:
    from gapcast.timefmt import now_rfc3339

    return now_rfc3339()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gapcast.tools.gpucheck",
        description=(
            "Run every GPU check this machine can run (pytest -m gpu, TensorRT engines fp32/fp16/int8 with the "
            "golden check, onnxruntime CUDA/TensorRT providers, torch CUDA training on NCCL, timings at batch "
            "1/64/256 against onnxruntime CPU); report what could not run. Installs nothing."
        ),
        epilog=(
            "examples:\n  deploy/jetson/gpu-check.sh                      # the shell wrapper, report in gpu-check-out/\n"
            "  python -m gapcast.tools.gpucheck --out /tmp/gc --bundle bundles/beijing --budget-s 300"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="report folder (default gpu-check-out)")
    parser.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of a fresh tiny export")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time bound of the run, seconds (default 450)")
    parser.add_argument("--train-steps", type=int, default=5, help="torch CUDA training steps (default 5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run_checks(args.out, bundle_path=args.bundle, budget_s=args.budget_s, train_steps=args.train_steps)
    print(report.to_markdown())
    for line in report.not_available():
        print(line)
    print(f"report: {args.out / 'gpu-check.json'} and {args.out / 'gpu-check.md'}")
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
