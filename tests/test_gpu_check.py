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
    assert list(parts) == ["env", "pytest", "train", "train_offload", "kernels", "step", "e2e"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["tail"][-800:] for n, p in parts.items()
                                                              if p["status"] != "ok"}
    assert parts["env"]["result"]["torch"] and parts["pytest"]["result"]["failures"] == 0
    assert parts["kernels"]["result"]["targets"] and parts["step"]["result"]["tiny_text"]
    for name in ("train", "train_offload"):
        steps = parts[name]["result"]["steps"]
        assert len(steps) == 1 and steps[0]["loss/grad_norm"] > 0  # the step updated the policy
    # e2e: srpo_fast + HF engine ran its steps on the trainer parts' model, with the update's work counted; TRL ran
    # too where it imports (the CPU venv has it), else it is reported unavailable with the reason
    e2e = parts["e2e"]["result"]
    assert e2e["device"] == "cpu" and e2e["work"]["model"].startswith("model: qwen2_5_vl")
    srpo = e2e["srpo_hf"]
    assert srpo["step_s"] > srpo["update_s"] > 0 and srpo["update_tflops"] > 0 and "update_mfu" not in srpo
    assert e2e["trl_hf"].get("step_s", 0) > 0 or e2e["trl_hf"]["unavailable"]
    assert f"srpo_hf: {srpo['step_s']:.2f} s/step" in (tmp_path / "gpu_check.md").read_text()
    report = json.loads((tmp_path / "e2e.json").read_text())
    (run,) = report["runs"]["srpo_hf"]
    assert all(step["update_tflop"] > 0 for step in run["steps"])
    assert json.loads((tmp_path / "gpu_check.json").read_text())["mode"].startswith("dry-run")
    assert (tmp_path / "gpu_check.md").read_text() == markdown(summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2e.json", "gpu_check.json", "gpu_check.md",
                                                          "kernels.json", "step.json"]  # a lease returns at most 8


def test_gpu_mode_benchmark_commands_parse(tmp_path):
    """The GPU run's benchmark command lines (never run here) are accepted by their scripts: each gets past its
    argument parsing to the point where it asks for CUDA."""
    import subprocess

    import torch

    from srpo_fast.gpu_check import REPO, build_parts

    if torch.cuda.is_available():
        pytest.skip("has CUDA: the GPU check itself runs these")
    parts = {p.name: p for p in build_parts(tmp_path, tmp_path, dry_run=False)}
    for name, needs in (("e2e", "--gpu needs a CUDA device"), ("step", "the full run needs CUDA")):
        assert "--smoke" not in parts[name].command
        proc = subprocess.run(parts[name].command, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode != 0 and needs in proc.stderr, proc.stderr[-2000:]
