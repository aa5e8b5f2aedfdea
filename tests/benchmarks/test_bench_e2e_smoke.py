"""benchmarks/e2e.py --smoke: srpo_fast and TRL's GRPOTrainer each run real GRPO steps on the same tiny work in their
own processes, and the report holds per-run steps, phase times, tokens, peak memory and the summary over runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def run_e2e(tmp_path, frameworks):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--smoke", "--threads", "1",
                           "--out", str(out), "--frameworks", *frameworks], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "e2e_smoke" and data["smoke"] is True and data["omp_num_threads"] == 1
    assert data["work"] == {"prompts": 2, "n": 2, "max_new_tokens": 8, "steps": 2, "repeats": 1, "temperature": 1.0,
                            "optimizer": "AdamW", "model": "tiny Qwen2.5-VL"}
    assert out.with_suffix(".png").is_file() or not any("step_s" in s for s in data["summary"].values())
    return data


def check_ok(data, name):
    (run,) = data["runs"][name]
    assert run["status"] == "ok", run.get("traceback") or run
    assert len(run["steps"]) == 2 and run["peak_rss_gb"] > 0.1
    for step in run["steps"]:
        assert 0 < step["generation_s"] < step["step_s"]
        assert 0 < step["response_tokens"] <= 2 * 2 * 8
    summary = data["summary"][name]
    assert summary["ok"] == 1 and summary["step_s"]["min"] == summary["step_s"]["median"] == run["steps"][1]["step_s"]
    assert summary["steps_per_s"]["median"] == pytest.approx(1 / summary["step_s"]["median"])


@pytest.mark.slow
def test_e2e_smoke_srpo_hf_and_trl_hf(tmp_path):
    pytest.importorskip("trl")
    data = run_e2e(tmp_path, ["srpo_hf", "trl_hf"])
    check_ok(data, "srpo_hf")
    check_ok(data, "trl_hf")
    assert {"update_s", "sync_s", "reward_s"} <= set(data["runs"]["srpo_hf"][0]["steps"][1])
    assert data["ratios"]["srpo_hf_over_trl_hf_steps_per_s"] == pytest.approx(
        data["summary"]["srpo_hf"]["steps_per_s"]["median"] / data["summary"]["trl_hf"]["steps_per_s"]["median"])


@pytest.mark.slow
@pytest.mark.vllm
def test_e2e_smoke_vllm_engines(tmp_path):
    """srpo_fast + vLLM runs; TRL + vLLM colocate is reported as it behaves stock: steps, or its error recorded."""
    pytest.importorskip("trl")
    pytest.importorskip("vllm")
    data = run_e2e(tmp_path, ["srpo_vllm", "trl_vllm"])
    check_ok(data, "srpo_vllm")
    (trl,) = data["runs"]["trl_vllm"]
    if trl["status"] == "ok":
        check_ok(data, "trl_vllm")
    else:
        assert trl["error"] and data["summary"]["trl_vllm"]["errors"] == [trl["error"]]


@pytest.mark.slow
def test_e2e_reports_a_framework_that_does_not_import_as_unavailable(tmp_path):
    """A machine without TRL (the lent GPU's image): TRL is reported unavailable with its import error and not run,
    srpo_fast still runs; the workers keep the caller's PYTHONPATH (where carried wheels are installed)."""
    shadow = tmp_path / "shadow" / "trl"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no trl on this image')\n")
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--smoke", "--threads", "1",
                           "--out", str(out), "--frameworks", "srpo_hf", "trl_hf"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["summary"]["trl_hf"] == {"label": "TRL + HF generate",
                                         "unavailable": "ImportError: no trl on this image"}
    assert list(data["runs"]) == ["srpo_hf"] and data["ratios"] == {}
    check_ok(data, "srpo_hf")
    assert "not available: ImportError: no trl on this image" in proc.stdout


def test_e2e_gpu_mode_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--gpu", "--out",
                           str(tmp_path / "e2e.json")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--gpu needs a CUDA device" in proc.stderr
    assert not (tmp_path / "e2e.json").exists()
