"""Run tests/dist/fsdp_worker.py under torchrun once per pytest session and share its result.

Several test files read the same launch (torchrun start-up costs seconds); they all import this module as
`dist.launch` (tests/ on sys.path), so the cache below is shared.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_RESULTS: dict[str, dict | AssertionError] = {}  # a failed launch is cached too: one run per session

TORCHRUN = [sys.executable, str(HERE / "loopback_run.py"), "--standalone"]  # torchrun, stores on 127.0.0.1 only


# A rare abort of a rank's process on this platform (2 shared cores, gloo): std::terminate from a c10d/gloo
# thread, seen in ~1 of 30 launches, never reproduced under a debugger, unrelated to what the worker computes.
PLATFORM_ABORT = "terminate called without an active exception"


def torchrun(script: Path, args: list[str], nproc: int = 2, timeout_s: float = 300.0,
             pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """Run script under torchrun in its own process group, so a hung collective is killed with all its ranks.
    A launch that dies of PLATFORM_ABORT is run once more (and says so in its stderr); any other failure is not."""
    proc = _torchrun_once(script, args, nproc, timeout_s, pythonpath)
    if proc.returncode != 0 and PLATFORM_ABORT in proc.stderr:
        first = proc.stderr[-2000:]
        proc = _torchrun_once(script, args, nproc, timeout_s, pythonpath)
        proc.stderr += f"\n[relaunched once after a platform abort; first launch's tail:]\n{first}"
    return proc


def _torchrun_once(script: Path, args: list[str], nproc: int, timeout_s: float,
                   pythonpath: tuple[Path, ...]) -> subprocess.CompletedProcess:
    paths = [str(REPO), *map(str, pythonpath), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n[killed after {timeout_s:.0f} s]"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def fsdp_worker_result(tiny_kit: dict, out_dir: Path) -> dict:
    """result.json of one 2-rank worker run (cached per session); fails with the workers' output tail."""
    key = str(tiny_kit["vl"])
    if key not in _RESULTS:
        out_dir.mkdir(parents=True, exist_ok=True)
        proc = torchrun(HERE / "fsdp_worker.py",
                        ["--kit", str(tiny_kit["vl"]), "--kit-text", str(tiny_kit["text"]), "--out", str(out_dir)])
        result_file = out_dir / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            _RESULTS[key] = AssertionError(f"torchrun worker failed (rc {proc.returncode}):\n"
                                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        else:
            _RESULTS[key] = {**json.loads(result_file.read_text()), "out_dir": str(out_dir)}
    result = _RESULTS[key]
    if isinstance(result, AssertionError):
        raise result
    return result

