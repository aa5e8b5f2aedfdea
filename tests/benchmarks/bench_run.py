"""Runs one benchmark script the way a user does and hands back its JSON report: the smoke tests' shared step."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def run_benchmark(script: str, *args: str, out: Path, timeout: int = 300, env: dict | None = None) -> dict:
    """`python benchmarks/SCRIPT ARGS --out OUT` from the repo root; asserts it exits 0, returns the report."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())
