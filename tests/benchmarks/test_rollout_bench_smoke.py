"""benchmarks/weight_sync.py --smoke runs end to end (module-copy sink always, the vLLM engine when installed) and
writes a well-formed report; the script itself checks that every variant left the sink equal to the source."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_weight_sync_benchmark_smoke(tmp_path):
    out = tmp_path / "weight_sync.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "weight_sync.py"), "--smoke", "--iters", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "weight_sync_smoke" and data["smoke"] is True
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert data["vllm_available"] is has_vllm
    expected = {"tiny_vl/module_copy"} | ({"tiny_vl/vllm_reload"} if has_vllm else set())
    assert set(data["results"]) == expected
    labels = {"per_param", "per_param_gather", "bucket_0.25MB", "bucket_0.25MB_ingest", "bucket_1MB",
              "bucket_1MB_ingest"}
    for result in data["results"].values():
        assert result["tensors"] == 57 and result["bytes"] > 1e6
        assert set(result["variants"]) == labels
        for v in result["variants"].values():
            assert v["seconds"] > 0 and math.isclose(v["GBps"], result["bytes"] / v["seconds"] / 1e9)
    assert data["copy_bandwidth_GBps"] > 0
