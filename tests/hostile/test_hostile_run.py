"""The trainer and the demo as an unlucky operator meets them: a run SIGKILLed after its step-0 validation but
before its first checkpoint (with leftovers of killed saves and exports around), a run in which every group is
filtered so no update ever happens, and a SIGTERM to the demo during stage 1. Real processes on the tiny kit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srpo_fast.utils.metrics import read_metrics

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # full trainer/demo processes: ~1 min each on 2 cores

ROOT = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early (rc {proc.returncode}):\n{proc.stdout.read()[-2000:]}\n"
                                 f"{proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def has_step(path: Path, step: int) -> bool:
    return path.is_file() and any(row.get("step") == step for row in read_metrics(path))


def test_a_run_that_never_updates_fails_loudly_and_a_killed_start_leaves_no_duplicate_rows(tiny_kit, tmp_path):
    """SRPO's preset gives the random-init tiny model reward 0 everywhere, so the accuracy filter drops every
    group: no optimizer update can happen. Killed once after its step-0 validation row, then rerun."""
    out = tmp_path / "run"
    args = ["srpo_fast.train", "--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"model.path={tiny_kit['vl']}",
            f"train.output_dir={out}", "train.max_steps=1", "train.prompts_per_step=2", "rollout.n=2",
            "rollout.max_tokens=8", "data.val_size=2", "train.val_every=1", "log.progress=false",
            "algo.filter_groups=true"]  # the demo turns SRPO's filter off; this run needs it
    proc = start(args)
    wait_for(lambda: has_step(out / "metrics.jsonl", 0), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # after validation at step 0, before any checkpoint
    proc.communicate()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*"))
    # leftovers of other processes killed mid-save and mid-export
    (out / "checkpoints" / ".tmp_step_00000001").mkdir(parents=True)
    (out / "checkpoints" / ".tmp_step_00000001" / "rank_00000.pt").write_bytes(b"partial")
    (out / ".final_model.tmp-424242").mkdir()

    proc = start(args)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 3, stdout[-2000:] + stderr[-4000:]
    assert "error: NO UPDATE: all 1 steps ended without a single optimizer update" in stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]  # step 0 once, though it was logged before the kill too
    assert rows[1]["groups/kept_frac"] == 0.0
    assert not (out / "final_model").exists()
    assert not (out / ".final_model.tmp-424242").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    again = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=240)  # resumed at the end: still no update, still an error
    assert again.returncode == 3 and "NO UPDATE" in again.stderr


def test_sigterm_during_demo_stage_one_stops_the_demo(tmp_path):
    out = tmp_path / "demo"
    # ~1000 SFT steps, so the signal lands inside stage 1 however quiet the machine is
    proc = start(["srpo_fast.demo", "--out", str(out), "--sft", "data.synthetic_size=8", "--sft",
                  "train.prompts_per_step=4", "--sft", "train.epochs=500", "log.progress=false"])
    wait_for(lambda: (out / "sft" / "metrics.jsonl").exists(), proc)
    time.sleep(1.0)  # the run has installed its signal handler right after opening its metrics
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-4000:]
    assert "stage 1 stopped before its end; stage 2 not started" in stdout
    assert "stopped by signal after step" in stdout
    assert not (out / "grpo").exists()
    assert any((out / "sft" / "checkpoints").glob("step_*"))
