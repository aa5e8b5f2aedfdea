"""benchmarks/cpu_adam.py --smoke runs end to end: every implementation measured (or skipped with its reason), each
compared with a float64 AdamW and with torch's single-tensor path."""
import importlib.util
import math

import pytest

from bench_run import ROOT, run_benchmark


@pytest.mark.slow
def test_cpu_adam_benchmark_smoke(tmp_path):
    out = tmp_path / "cpu_adam.json"
    data = run_benchmark("cpu_adam.py", "--smoke", out=out, timeout=600, env={"PYTHONPATH": str(ROOT)})
    assert data["benchmark"] == "cpu_adam_smoke" and list(data["sizes"]) == ["1M"]
    rows = data["sizes"]["1M"]
    measured = {name: row for name, row in rows.items() if "step_ms" in row}
    assert {"torch_single", "torch_foreach"} <= set(measured)
    for name, row in measured.items():
        assert row["step_ms"] > 0 and math.isfinite(row["GB_per_s"]), name
        assert row["vs_fp64"]["params_ulps_at_scale"] <= 8, name  # every path lands within fp32 rounding
    assert measured["torch_foreach"]["params_vs_torch_single"]["ulps_at_scale"] == 0.0  # same math, same rounding
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    assert ("step_ms" in rows["deepspeed_cpu_adam"]) == has_deepspeed
    if not has_deepspeed:
        assert "needs deepspeed" in rows["deepspeed_cpu_adam"]["skipped"]
