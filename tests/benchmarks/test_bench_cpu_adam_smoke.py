"""benchmarks/cpu_adam.py --smoke runs end to end: every implementation measured (or skipped with its reason), each
compared with a float64 AdamW and with torch's single-tensor path."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.slow
def test_cpu_adam_benchmark_smoke(tmp_path):
    out = tmp_path / "cpu_adam.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_adam.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
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
