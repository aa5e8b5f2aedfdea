"""Kernel compile check as a benchmark: `python benchmarks/compile.py --out F [--smoke]`.

Runs ``python -m srpo_fast.kernels.compile_check`` for sm_90 and sm_80 (``--smoke``: its fast subset) and writes
the full table (every variant: registers, spills, shared memory, CTAs/SM, tensor cores, SASS of the steady loop)
to ``results/compile/compile_check{_smoke}.json`` and ``.md`` beside ``--out``; ``--out`` gets the summary.
Needs no GPU. The exit status is the check's: 1 when a selectable variant fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="the fast subset only")
    parser.add_argument("--arch", default="90,80")
    args = parser.parse_args(argv)
    table_dir = args.out.parent / "compile"
    stem = "compile_check" + ("_smoke" if args.smoke else "")
    table_json, table_md = table_dir / f"{stem}.json", table_dir / f"{stem}.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "srpo_fast.kernels.compile_check", "--arch", args.arch, "--json", str(table_json),
           "--md", str(table_md), *(["--fast"] if args.smoke else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    report = json.loads(table_json.read_text()) if table_json.is_file() else None
    def shown(path: Path) -> str:
        return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)

    summary = {"benchmark": "compile", "smoke": args.smoke, "returncode": proc.returncode,
               "table_json": shown(table_json), "table_md": shown(table_md),
               "meta": report["meta"] if report else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
