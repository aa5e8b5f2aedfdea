"""The README's main job, run for real on the tiny kit: metrics, saved config, reloadable final model."""
import subprocess
import sys

from srpo_fast.config import load_config
from srpo_fast.utils.metrics import read_metrics


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "srpo_fast.demo", "--config", "configs/demo_cpu.yaml", f"train.output_dir={out}",
           "train.max_steps=2", "train.prompts_per_step=2", "rollout.n=2", "rollout.max_tokens=24"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0 < row["data/response_len"] <= 24
        assert row["data/kept_groups"] == 2 and "loss/pg" in row
        assert -0.25 <= row["reward/total"] <= 2.1
    assert load_config(out / "config.yaml").rollout.n == 2
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "final_model", local_files_only=True)
    assert (out / "plots" / "reward.png").is_file()
