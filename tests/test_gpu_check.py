"""srpo_fast/gpu_check.py: a part that hangs is killed at its limit and the others still run; the CPU dry run goes
through every part (the same commands the GPU run uses, at tiny shapes) and writes the JSON and markdown summaries."""
import json
import sys
import time

import pytest

from srpo_fast.gpu_check import Part, markdown, run_check, run_part


def test_a_hanging_part_is_killed_at_its_limit_and_the_next_runs():
    start = time.perf_counter()
    hung = run_part(Part("hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                         timeout_s=2))
    fine = run_part(Part("fine", [sys.executable, "-c", "print('done')"], timeout_s=30))
    assert time.perf_counter() - start < 30
    assert hung.status == "timeout" and "started" in hung.tail and "killed after 2 s" in hung.tail
    assert fine.status == "ok" and fine.tail.strip() == "done"
    failed = run_part(Part("fails", [sys.executable, "-c", "raise SystemExit(3)"], timeout_s=30))
    assert failed.status == "failed" and failed.returncode == 3


def test_parts_past_the_budget_are_skipped_and_said_so(tmp_path):
    summary = run_check(tmp_path, dry_run=True, only={"env", "pytest"}, budget_s=5)
    assert [(p["name"], p["status"]) for p in summary["parts"]] == [("env", "skipped"), ("pytest", "skipped")]
    assert "budget" in summary["parts"][0]["tail"] and "| env | skipped |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_goes_through_every_part(tmp_path):
    summary = run_check(tmp_path, dry_run=True, budget_s=3600)  # a loaded 2-core machine: no budget to speak of
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["env", "pytest", "train", "train_offload", "kernels", "step"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["tail"][-800:] for n, p in parts.items()
                                                              if p["status"] != "ok"}
    assert parts["env"]["result"]["torch"] and parts["pytest"]["result"]["failures"] == 0
    assert parts["kernels"]["result"]["targets"] and parts["step"]["result"]["tiny_text"]
    for name in ("train", "train_offload"):
        steps = parts[name]["result"]["steps"]
        assert len(steps) == 1 and steps[0]["loss/grad_norm"] > 0  # the step updated the policy
    assert json.loads((tmp_path / "gpu_check.json").read_text())["mode"].startswith("dry-run")
    assert (tmp_path / "gpu_check.md").read_text() == markdown(summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md", "kernels.json",
                                                          "step.json"]  # few files: a lease returns at most 8
