"""Every benchmark in one call: `python benchmarks/run_all.py [--smoke] [--only kernels step ...] [--out-dir DIR]`.

Each script runs in its own process (a crash or OOM in one never loses the others' results) under a time limit,
and writes its JSON (+ PNG) into the output dir; `run_all.json` there records what ran, how long it took, and
what failed with the tail of its log. On the H100 this is the one call the session makes (DEVELOPERS' brief);
`--smoke` runs every script's tiny CPU mode (the test suite does, so none of them rots).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._common import environment  # noqa: E402

# name -> extra args on a full run (the smoke run passes --smoke alone); kernels first: the product's core;
# compile needs no GPU (it builds every kernel variant for sm_90/sm_80 and reads the SASS)
BENCHMARKS = {"kernels": [], "compile": [], "step": [], "weight_sync": [], "reward": [], "e2e": []}


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def run_one(name: str, smoke: bool, out_dir: Path, timeout_s: float) -> dict:
    out = out_dir / f"{name}{'_smoke' if smoke else ''}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out), *(["--smoke"] if smoke else BENCHMARKS[name])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parent)
        status, log = ("ok" if proc.returncode == 0 and out.is_file() else f"exit {proc.returncode}",
                       proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        status = f"timeout after {timeout_s:.0f} s"
        log = _text(exc.stdout) + _text(exc.stderr)
    seconds = time.perf_counter() - start
    print(f"[run_all] {name:12s} {status:24s} {seconds:7.1f} s", flush=True)
    return {"name": name, "status": status, "seconds": round(seconds, 2),
            "results": str(out) if out.is_file() else None,
            "log_tail": None if status == "ok" else log[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every script's tiny CPU mode")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per benchmark")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_one(name, args.smoke, args.out_dir, args.timeout_s) for name in args.only]
    summary = {"benchmark": "run_all", "smoke": args.smoke, "environment": environment(), "runs": runs}
    path = args.out_dir / f"run_all{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[run_all] wrote {path}")
    return 0 if all(run["status"] == "ok" for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
