"""benchmarks/run_all.py runs the chosen benchmarks in their own processes and records each outcome."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_run_all_smoke_records_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--only", "reward",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run_all_smoke.json").read_text())
    (run,) = summary["runs"]
    assert run["name"] == "reward" and run["status"] == "ok" and run["seconds"] > 0
    assert json.loads(Path(run["results"]).read_text())["smoke"] is True

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--only", "reward",
                           "--out-dir", str(tmp_path), "--timeout-s", "0.01"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    (run,) = json.loads((tmp_path / "run_all_smoke.json").read_text())["runs"]
    assert run["status"].startswith("timeout")
