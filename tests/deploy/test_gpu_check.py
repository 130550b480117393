"""gpu-check's report logic on the CPU: here everything is "not available" except onnxruntime CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gapcast.tools.gpucheck import (
    FAILED,
    NOT_AVAILABLE,
    OK,
    PARTS,
    PartResult,
    Report,
    run_checks,
    time_runner,
)

REPO = Path(__file__).resolve().parents[2]
CPU_ONLY = {
    "python": "3.11", "machine": "x86_64", "torch": "2.13.0", "cuda": None, "tensorrt": None,
    "tensorrt_error": "ModuleNotFoundError: No module named 'tensorrt'", "onnxruntime": "1.x",
    "ort_providers": ["CPUExecutionProvider"],
}  # fmt: skip


def test_report_exit_code_markdown_and_not_available_lines():
    r = Report(host="box (x86_64)", started="2026-12-02T15:00:00Z", seconds=12.0)
    r.parts = [
        PartResult("environment", OK, "torch 2.13.0"),
        PartResult("tensorrt_fp16", NOT_AVAILABLE, "TensorRT's Python binding does not import"),
        PartResult("ort_cpu", OK, "golden check passed | fp32"),
    ]
    r.timings = [{"backend": "onnxruntime CPU", "batch": 64, "median_ms": 12.5, "windows_per_s": 5120.0,
                  "speedup_vs_ort_cpu": 1.0}]  # fmt: skip
    assert r.exit_code() == 0
    assert r.not_available() == ["not available here: tensorrt_fp16: TensorRT's Python binding does not import"]
    md = r.to_markdown()
    assert "| ort_cpu | ok | 0.0 | golden check passed \\| fp32 |" in md  # a | in a detail does not break the table
    assert "| onnxruntime CPU | 64 | 12.500 | 5120 | 1.00x |" in md
    assert md.rstrip().endswith("- not available here: tensorrt_fp16: TensorRT's Python binding does not import")
    r.parts.append(PartResult("torch_cuda_train", FAILED, "loss went up"))
    assert r.exit_code() == 1 and r.to_dict()["exit_code"] == 1


def test_time_runner_takes_the_median_after_a_warm_up():
    t = [0.0]
    costs = iter([9.0, 1.0, 3.0, 2.0, 2.0, 2.0])  # the 9 s warm-up is not counted

    def run(*_):
        t[0] += next(costs)

    assert time_runner(run, (None, None, None), min_time_s=6.5, clock=lambda: t[0]) == 2.0


def test_run_checks_on_this_cpu_machine(tiny_bundle, tmp_path):
    out = tmp_path / "gc"
    report = run_checks(out, bundle_path=tiny_bundle, batches=(1, 4), min_time_s=0.01, probe=lambda: dict(CPU_ONLY))
    status = {p.name: p.status for p in report.parts}
    assert list(status) == list(PARTS)
    assert status == {
        "environment": OK, "pytest_gpu": NOT_AVAILABLE, "bundle": OK, "tensorrt_fp32": NOT_AVAILABLE,
        "tensorrt_fp16": NOT_AVAILABLE, "tensorrt_int8": NOT_AVAILABLE, "ort_cpu": OK, "ort_cuda": NOT_AVAILABLE,
        "ort_tensorrt": NOT_AVAILABLE, "torch_cuda_train": NOT_AVAILABLE, "timing": OK,
    }  # fmt: skip
    assert report.exit_code() == 0
    assert "golden check passed for fp32" in report.part("ort_cpu").detail
    assert [(r["backend"], r["batch"], r["speedup_vs_ort_cpu"]) for r in report.timings] == [
        ("onnxruntime CPU", 1, 1.0), ("onnxruntime CPU", 4, 1.0)
    ]
    assert all(r["median_ms"] > 0 and r["windows_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1000, rel=0.01)
               for r in report.timings)  # fmt: skip
    na = report.not_available()
    assert len(na) == 7 and "not available here: ort_cuda: this onnxruntime build has no CUDAExecutionProvider" in na[4]
    saved = json.loads((out / "gpu-check.json").read_text())
    assert saved["schema"] == "gapcast/gpu-check/1" and saved["not_available"] == na and saved["exit_code"] == 0
    assert (out / "gpu-check.md").read_text() == report.to_markdown()
    assert np.isfinite(report.part("ort_cpu").figures["golden_max_abs"])


@pytest.mark.slow
def test_the_shell_wrapper_runs_here_and_exits_0(tiny_bundle, tmp_path):
    res = subprocess.run(
        ["bash", str(REPO / "deploy" / "jetson" / "gpu-check.sh"), str(tmp_path / "gc"), "--bundle", str(tiny_bundle),
         "--budget-s", "120"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "not available here: tensorrt_int8:" in res.stdout
    assert "not available here: ort_cpu" not in res.stdout
    report = json.loads((tmp_path / "gc" / "gpu-check.json").read_text())
    assert {r["batch"] for r in report["timings"] if r["backend"] == "onnxruntime CPU"} == {1, 64, 256}
