"""Checkpoint / resume (srpo_fast.utils.checkpoint): resuming equals the uninterrupted run exactly (one process,
and 2 ranks under FSDP2 via the shared torchrun worker), RNG and user state come back, a save killed or failing
half-way leaves the previous checkpoint loadable and chosen by latest_checkpoint, keep-last pruning."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from srpo_fast.models.fsdp import build_lr_scheduler, build_optimizer
from srpo_fast.utils.checkpoint import (checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                                        save_checkpoint)
from srpo_fast.utils.distributed import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist.launch import REPO, fsdp_worker_result  # noqa: E402


@pytest.fixture(scope="module")
def worker(tiny_kit, tmp_path_factory):
    return fsdp_worker_result(tiny_kit, tmp_path_factory.mktemp("fsdp_worker"))


def text_model(tiny_kit):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_kit["text"], local_files_only=True).train()


def training(model):
    optimizer = build_optimizer(model, 2e-3, weight_decay=0.1)
    scheduler = build_lr_scheduler(optimizer, total_steps=6, warmup_ratio=0.3, schedule="cosine", min_lr_ratio=0.1)
    return optimizer, scheduler


def random_step(model, optimizer, scheduler) -> float:
    """Draws its batch from python, numpy and torch RNGs, so a resume must restore all three to repeat it."""
    length = random.randint(6, 14)
    offset = int(np.random.randint(0, 50))
    ids = torch.randint(10 + offset, 1000, (2, length))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def test_single_process_resume_equals_uninterrupted(tiny_kit, tmp_path):
    seed_everything(11)
    model = text_model(tiny_kit)
    optimizer, scheduler = training(model)
    first = [random_step(model, optimizer, scheduler) for _ in range(2)]
    saved = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                            extra={"data_pos": 17, "epoch": 0, "seen": torch.arange(3)})
    rest = [random_step(model, optimizer, scheduler) for _ in range(3)]
    assert len(set(first + rest)) == 5

    seed_everything(12345)  # a different RNG stream: only the checkpoint can bring the batches back
    fresh = text_model(tiny_kit)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.5)
    optimizer2, scheduler2 = training(fresh)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=fresh, optimizer=optimizer2, scheduler=scheduler2)
    assert latest_checkpoint(tmp_path) == saved
    assert state["step"] == 2 and state["extra"]["data_pos"] == 17 and state["extra"]["epoch"] == 0
    assert torch.equal(state["extra"]["seen"], torch.arange(3))
    resumed = [random_step(fresh, optimizer2, scheduler2) for _ in range(3)]
    assert resumed == rest
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.dist
def test_two_rank_fsdp_resume_equals_uninterrupted(worker):
    assert worker["resume_step"] == 2 and worker["resume_latest_name"] == "step_00000002"
    assert worker["resume_losses_exact"], (worker["resumed_losses"], worker["fsdp_losses"])
    assert worker["resume_param_diff"] == 0.0
    assert worker["resume_lr_equal"]
    assert worker["resume_rng_equal"], "per-rank RNG states were not restored"
    assert worker["resume_extra_ok"], "per-rank extra dict was not restored"


@pytest.mark.dist
def test_checkpoint_from_another_world_size_is_refused(worker, tiny_kit):
    path = latest_checkpoint(Path(worker["out_dir"]) / "ckpt")
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_kit["vl"], local_files_only=True)
    with pytest.raises(ValueError, match="saved by 2 ranks"):
        load_checkpoint(path, model=model)


def test_killed_save_leaves_previous_checkpoint(tiny_kit, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist" / "kill_mid_save.py"), str(tiny_kit["text"]),
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = tmp_path / ".tmp_step_00000002"
    assert (partial / "dcp" / ".metadata").exists() and (partial / "rank_00000.pt").exists()  # it did write
    assert not (partial / "meta.json").exists()
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 1)]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)

    model = text_model(tiny_kit)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=build_optimizer(model, 1e-3))
    assert state == {"step": 1, "extra": {"data_pos": 1}}
    expected = load_file(str(tmp_path / "expected_step1.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name

    save_checkpoint(tmp_path, 2, model=model)  # the next save clears the debris
    assert not partial.exists()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)


class FailingScheduler:
    """A scheduler whose state cannot be read: the save fails after DCP has written the model shards."""

    def state_dict(self):
        raise OSError("No space left on device")


def test_failed_save_and_bad_extra_keep_previous(tiny_kit, tmp_path):
    model = text_model(tiny_kit)
    good = save_checkpoint(tmp_path, 5, model=model, extra={"pos": 5})
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 6, model=model, scheduler=FailingScheduler())
    assert not (tmp_path / ".tmp_step_00000006").exists()  # the partial checkpoint is deleted at once
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(TypeError, match="extra must hold"):
        save_checkpoint(tmp_path, 7, model=model, extra={"fn": FailingScheduler()})
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(good, model=model)["extra"] == {"pos": 5}


def test_keep_last_and_incomplete_dirs(tiny_kit, tmp_path):
    model = text_model(tiny_kit)
    (tmp_path / "step_00000099").mkdir(parents=True)  # no meta.json: incomplete, ignored, never pruned as "old"
    (tmp_path / "notes").mkdir()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 2), checkpoint_dir(tmp_path, 3)]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 3)
    resaved = save_checkpoint(tmp_path, 3, model=model, keep_last=None)  # same step again replaces it
    assert resaved == checkpoint_dir(tmp_path, 3) and len(list_checkpoints(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_00000002", "step_00000003", "step_00000099"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_bad_arguments(tiny_kit, tmp_path):
    model = text_model(tiny_kit)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model=model, keep_last=0)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path, model=model)
    save_checkpoint(tmp_path, 1, model=model)
    with pytest.raises(ValueError, match="no scheduler state"):
        load_checkpoint(checkpoint_dir(tmp_path, 1), model=model,
                        scheduler=build_lr_scheduler(build_optimizer(model, 1e-3), total_steps=2))
