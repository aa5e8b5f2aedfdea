"""The README's main job (`python -m srpo_fast.demo`, what scripts/demo.sh runs), shrunk: cold-start set → SFT →
GRPO from the SFT model, all with the real trainer; a rerun resumes instead of starting over."""
import subprocess
import sys

from srpo_fast.config import load_config
from srpo_fast.data.records import load_records
from srpo_fast.reward import score_batch
from srpo_fast.utils.metrics import read_metrics


def test_demo_runs_both_stages_and_resumes(tmp_path):
    out = tmp_path / "demo"
    # algo.filter_groups=false: 8 groups of 2 rarely hold mixed first answers, and a GRPO stage that never updates
    # is an error (srpo_fast.train.run.NoUpdateError)
    cmd = [sys.executable, "-m", "srpo_fast.demo", "--out", str(out), "--sft", "data.synthetic_size=16",
           "--sft", "train.prompts_per_step=8", "--sft", "train.epochs=1", "train.max_steps=2", "data.val_size=3",
           "rollout.n=2", "train.prompts_per_step=4", "rollout.max_tokens=24", "log.progress=false",
           "algo.filter_groups=false",
           "algo.dynamic_sampling=false"]  # a fixed 4 prompts x n=2 per step
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    records, report = load_records([out / "cold_start" / "data.jsonl"])
    assert len(records) == 16 and report.skipped == 0
    targets = score_batch([r["response"] for r in records], [r["answer"] for r in records])
    assert bool(targets.has_reflection.all())  # every target is a full SRPO answer, whose final answer is wrong only
    assert [bool(x) for x in targets.second_correct] == [r["a2_correct"] for r in records]  # where the teacher erred

    sft_rows = read_metrics(out / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_rows] == [1, 2] and all(r["loss/nll"] > 0 for r in sft_rows)
    val_rows = [r for r in read_metrics(out / "grpo" / "metrics.jsonl") if "val/acc_final" in r]
    assert [r["step"] for r in val_rows] == [0, 2]  # before training, and at the last step
    assert all(r["val/rollout_samples"] == 3 and 0 <= r["val/acc_final"] <= 1 for r in val_rows)
    grpo_rows = read_metrics(out / "grpo" / "metrics.jsonl")[1:]
    assert [r["step"] for r in grpo_rows] == [1, 2]
    for row in grpo_rows:
        assert 0 < row["response/length_mean"] <= 24 and row["rollout/samples"] == 8
        assert -0.25 <= row["reward/total"] <= 2.1
    grpo_cfg = load_config(out / "grpo" / "config.yaml")
    assert grpo_cfg.model.path == str(out / "sft" / "final_model") and grpo_cfg.rollout.n == 2
    from transformers import Qwen2_5_VLForConditionalGeneration

    Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "grpo" / "final_model", local_files_only=True)
    assert (out / "grpo" / "plots").is_dir() and any((out / "grpo" / "plots").iterdir())
    assert "[demo] summary over 2 GRPO steps" in result.stdout and "val first-answer accuracy" in result.stdout
    assert (out / "summary.png").stat().st_size > 10_000

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resumed from") == 2
    assert [r["step"] for r in read_metrics(out / "grpo" / "metrics.jsonl")] == [0, 1, 2]
