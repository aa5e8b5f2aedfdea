"""The embedded demo learns: its own settings (configs/demo_sft_cpu.yaml, configs/demo_cpu.yaml), unchanged, on two
seeds. A trainer that does not update (lr 0, a broken loss or advantage, a sync that never reaches the rollout
engine) fails every assertion below but the last; the demo's summary says how t is computed (demo_report.py)."""
import os
import subprocess
import sys

import pytest

from srpo_fast.demo_report import summarize
from srpo_fast.utils.metrics import read_metrics

SEEDS = (0, 1)


@pytest.mark.slow
def test_demo_settings_learn_on_two_seeds(tmp_path):
    # one thread per run, both runs at once: 2 cores, and the numbers do not depend on the machine's thread count
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {seed: subprocess.Popen(
        [sys.executable, "-m", "srpo_fast.demo", "--out", str(tmp_path / f"seed{seed}"), "--sft",
         f"train.seed={seed}", f"train.seed={seed}", "log.progress=false", "--sft", "log.progress=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for seed in SEEDS}
    for seed, proc in runs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"seed {seed}:\n{out[-3000:]}"
    for seed in SEEDS:
        out = tmp_path / f"seed{seed}"
        s = summarize(read_metrics(out / "sft" / "metrics.jsonl"), read_metrics(out / "grpo" / "metrics.jsonl"))
        first, final = s["val/acc_first"], s["val/acc_final"]
        assert s["trend"]["t"] >= 4, (seed, s)  # the training reward rises far outside its per-step noise
        assert first[1] - first[0] >= 0.3, (seed, s)  # the first answer learns to read the image
        assert final[1] - final[0] >= 0.2 and final[1] >= 0.9, (seed, s)  # GRPO fixes the teacher's confusions
        assert s["val/reflect_rate"][1] >= 0.9, (seed, s)  # greedy answers keep the reflection format
        assert s["well_formed"][1] >= 0.75, (seed, s)
