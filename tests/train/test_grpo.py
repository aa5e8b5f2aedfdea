"""The GRPO trainer end to end (`python -m srpo_fast.train`, `torchrun -m srpo_fast.train`) on the tiny kit.

The SRPO presets give a random-init model reward 0 everywhere (it never writes the tags), so these runs use a test
reward with a real signal (tests/trainer_rewards.py, as a "module:function" reward preset)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent.parent
TESTS = Path(__file__).resolve().parent.parent


def run_trainer(args: list[str], *, timeout: int = 300, returncode: int = 0) -> subprocess.CompletedProcess:
    """`python -m srpo_fast.train ARGS` (one process: a real one-rank group), asserting its exit status."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def hf_args(model: Path, out: Path, steps: int) -> list[str]:
    """The demo config with the sizes these tests are written for pinned (the demo's own are tuned for learning):
    4 prompts x n=4 of the mixed synthetic task, no refills."""
    return ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"model.path={model}", f"train.output_dir={out}",
            f"train.max_steps={steps}", "train.save_every=1", "reward.preset=trainer_rewards:digit_share",
            "algo.filter_groups=false", "train.val_every=0", "rollout.max_tokens=24", "train.lr=3e-3",
            "log.progress=false", "train.max_tokens_per_microbatch=600", "train.prompts_per_step=4", "rollout.n=4",
            "data.synthetic_size=32", "data.synthetic_tasks=[count,add,compare,color]", "data.synthetic_difficulty=1",
            "data.val_size=16", "algo.dynamic_sampling=false", "algo.max_gen_rounds=4"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_kit, tmp_path):
    """3 steps straight vs 2 steps, stop, resume for the 3rd: identical weights and step-3 metrics. Along the way:
    the reward has signal, so the weights move; every step logs; the export reloads."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_trainer(hf_args(tiny_kit["vl"], straight, 3))
    run_trainer(hf_args(tiny_kit["vl"], resumed, 2))
    assert [row["step"] for row in metrics(resumed)] == [1, 2]
    proc = run_trainer(hf_args(tiny_kit["vl"], resumed, 3))
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout

    a = load_file(straight / "final_model" / "model.safetensors")
    b = load_file(resumed / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.float32}  # exported in model.dtype (the demo config's float32)
    rows_a, rows_b = metrics(straight), metrics(resumed)
    assert all(f"timing/{phase}_s" in rows_a[0] for phase in ("rollout", "reward", "sleep", "train", "sync"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    for key in ("reward/total", "loss/pg_loss", "loss/grad_norm", "response/length_mean", "loss/entropy_mean"):
        assert rows_a[2][key] == rows_b[2][key], key

    base = load_file(tiny_kit["vl"] / "model.safetensors")
    changed = [k for k in a if "visual" not in k and not torch.equal(a[k], base[k])]
    frozen_same = [k for k in a if "visual.blocks" in k and torch.equal(a[k], base[k])]
    assert changed and frozen_same  # the language model learned; the frozen vision tower did not move
    assert all(r["loss/grad_norm"] > 0 and r["train/items"] > 0 for r in rows_a)
    assert rows_a[0]["rollout/samples"] == 16 and rows_a[0]["groups/kept_frac"] == 1.0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def test_fresh_start_refuses_to_overwrite_checkpoints(tiny_kit, tmp_path):
    out = tmp_path / "run"
    run_trainer(hf_args(tiny_kit["vl"], out, 1))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.train", *hf_args(tiny_kit["vl"], out, 2),
                           "train.resume=false"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "already holds checkpoints" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.train", "train.lr=-1"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 2 and "train.lr must be > 0" in proc.stderr


WORKER = r'''
import json, sys
from pathlib import Path

import torch
from srpo_fast.config import load_config
from srpo_fast.models import iter_full_weights
from srpo_fast.rollout import HFEngine, RolloutRequest, SamplingConfig
from srpo_fast.train.grpo import train_grpo
from srpo_fast.utils.distributed import init_distributed, rank

config, out = sys.argv[1], Path(sys.argv[2])
cfg = load_config(config, sys.argv[3:])
init_distributed()
probe = [RolloutRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "count the shapes"}]}])]
greedy = SamplingConfig(temperature=0.0, max_tokens=12)
checks = []
reference = []


def check_sync(step, run, engine, metrics):
    """After the step's sync the engine must act exactly like the trained policy: greedy ids of an HF copy that
    holds the gathered policy weights equal the engine's."""
    full = [pair for bucket in iter_full_weights(run.model) for pair in bucket]  # collective
    if not reference:
        reference.append(HFEngine(engine.config))
    copy = reference[0]
    copy.update_weights(full)
    ids_engine = engine.generate(probe, greedy).samples[0].response_ids
    ids_policy = copy.generate(probe, greedy).samples[0].response_ids
    checks.append({"step": step, "rank": rank(), "equal": ids_engine == ids_policy, "ids": ids_engine})


train_grpo(cfg, callbacks=[check_sync])
(out / f"checks_{rank()}.json").write_text(json.dumps(checks))
'''


@pytest.mark.vllm
@pytest.mark.dist
def test_two_ranks_with_colocated_vllm_engines(tiny_kit, tmp_path):
    """torchrun, 2 ranks, FSDP2 + one vLLM engine per rank: each step's in-place sync leaves every engine acting
    exactly like the trained policy, the engines' greedy output changes as the policy learns, and the run
    checkpoints, logs and exports."""
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(script), str(ROOT / "configs" / "demo_cpu.yaml"), str(out), *hf_args(tiny_kit["vl"], out, 2)[2:],
            "rollout.engine=vllm", "rollout.kv_cache_gb=0.02", "rollout.enforce_eager=true",
            "rollout.max_model_len=1024", "data.max_prompt_tokens=900", "train.lr=2e-2"]
    from dist.launch import torchrun

    proc = torchrun(Path(args[0]), args[1:], timeout_s=400, pythonpath=(TESTS,))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    checks = [json.loads((out / f"checks_{r}.json").read_text()) for r in range(2)]
    for rank_checks in checks:
        assert [c["step"] for c in rank_checks] == [1, 2]
        assert all(c["equal"] for c in rank_checks), rank_checks
    assert checks[0][0]["ids"] == checks[1][0]["ids"]  # both engines hold the same weights
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rollout/samples"] == 16  # 4 prompts x n=4 over 2 ranks, summed
    assert rows[0]["loss/grad_norm"] > 0 and rows[0]["sync/tensors"] > 0
    assert (out / "final_model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_00000002" / "meta.json").is_file()


def test_text_only_model_trains_on_text_records(tiny_kit, tmp_path):
    """Qwen2 (no vision) on jsonl records without images: same trainer, [1, L] position ids, no M-RoPE."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b), "images": []}) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]))
    out = tmp_path / "run"
    run_trainer([*hf_args(tiny_kit["text"], out, 1), f"data.train_files=[{data}]"])
    (row,) = metrics(out)
    assert row["rollout/samples"] == 16 and row["loss/grad_norm"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final_model", local_files_only=True)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(tiny_kit, tmp_path):
    """A preemption notice (SIGTERM) mid-run: the step in flight finishes, a checkpoint is written for it, the
    process exits cleanly without a final export; rerunning continues from that step."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "srpo_fast.train", *hf_args(tiny_kit["vl"], out, 50),
                             "train.save_every=1000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "stopped by signal" in stdout
    last = metrics(out)[-1]["step"]
    assert 1 <= last < 50
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{last:08d}"]
    assert not (out / "final_model").exists()
    proc = run_trainer([*hf_args(tiny_kit["vl"], out, last + 1), "train.save_every=1000"])
    assert f"step {last})" in proc.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, last + 2))


@pytest.mark.slow
def test_dynamic_sampling_resumes_exactly_and_max_steps_past_the_epochs_adds_one(tiny_kit, tmp_path):
    """Dynamic sampling on, a filter that keeps only odd-answer groups (tests/trainer_rewards.py), 8 records at 4
    per step (2 steps per epoch), train.epochs=1 but train.max_steps=3: the run says it adds an epoch and runs 3
    steps; extra rounds refill the steps (drawn per step, so 2 steps + resume = 3 straight, bit for bit)."""
    extra = ["algo.dynamic_sampling=true", "algo.max_gen_rounds=3", "algo.filter_groups=true",
             "reward.preset=trainer_rewards:odd_answers_mixed", "data.synthetic_size=8", "train.epochs=1",
             "rollout.max_tokens=12"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_trainer([*hf_args(tiny_kit["vl"], straight, 3), *extra])
    assert "[train] grpo: 3 steps = 1.5 epochs x 2 steps over 8 records" in proc.stdout
    assert "train.max_steps=3 adds epochs" in proc.stdout and "dynamic sampling refills to 4" in proc.stdout
    run_trainer([*hf_args(tiny_kit["vl"], resumed, 2), *extra])
    run_trainer([*hf_args(tiny_kit["vl"], resumed, 3), *extra])
    a = load_file(straight / "final_model" / "model.safetensors")
    b = load_file(resumed / "final_model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    clock = ("time", "timing/", "perf/")  # wall-clock readings differ; every other metric must not
    assert {k: v for k, v in rows_a[2].items() if not k.startswith(clock)} == {
        k: v for k, v in rows_b[2].items() if not k.startswith(clock)}
    assert [r["data/epoch"] for r in rows_a] == [0, 0, 1]
    for row in rows_a:  # every step refilled to 4 kept groups of 4 samples within the 3 rounds
        assert row["dynamic/trained_groups"] == 4 and row["dynamic/filled"] == 1.0 and row["train/items"] == 16
        assert row["dynamic/gen_rounds"] >= 2 and row["rollout/samples"] == 16 * row["dynamic/gen_rounds"]


def test_a_step_with_every_group_filtered_says_so(tiny_kit, tmp_path):
    """The random model never writes the answer format: the paper reward is 0 everywhere, the accuracy filter drops
    every group and nothing trains. The step line and the metrics say so instead of logging a quiet step."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b), "images": []}) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]))
    out = tmp_path / "run"
    args = [a for a in hf_args(tiny_kit["text"], out, 1) if not a.startswith(("reward.preset", "algo.filter_groups"))]
    # its only step did not update, so the run ends as an error (exit 3, srpo_fast.train.run.NoUpdateError)
    proc = run_trainer([*args, f"data.train_files=[{data}]", "rollout.max_tokens=8", "algo.filter_groups=true"],
                       returncode=3)
    (row,) = metrics(out)
    assert row["train/no_update"] == 1.0 and row["train/items"] == 0 and row["groups/kept_frac"] == 0
    assert "NO UPDATE" in proc.stdout and "accuracy filter dropped all 4 groups" in proc.stdout
    assert "loss/grad_norm" not in row and "NO UPDATE: all 1 steps ended without" in proc.stderr
