"""train/run.py's optimizer step: clip to max_grad_norm, step, schedule; a non-finite gradient norm skips the update
(and is counted) so one bad batch cannot poison the weights, while the schedule still advances."""
import math
from pathlib import Path

import pytest
import torch

from srpo_fast.config import load_config
from srpo_fast.train.run import Run


def tiny_run(max_grad_norm: float) -> Run:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    cfg = load_config(None, [f"train.max_grad_norm={max_grad_norm}"])
    return Run(cfg=cfg, out_dir=Path("."), model_path=Path("."), device=torch.device("cpu"), model=model,
               optimizer=optimizer, scheduler=scheduler, logger=None, start_step=0, total_steps=2)


def test_optimizer_step_clips_steps_and_schedules():
    run = tiny_run(max_grad_norm=1.0)
    before = run.model.weight.detach().clone()
    run.model.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(24), clipped to 1
    run.model.bias.grad = torch.zeros(2)
    out = run.optimizer_step()
    assert math.isclose(out["grad_norm"], math.sqrt(24.0), rel_tol=1e-6) and out["skipped_update"] == 0.0
    step = before - run.model.weight.detach()
    torch.testing.assert_close(step, torch.full((2, 3), 0.5 * 2.0 / math.sqrt(24.0)))  # lr x clipped gradient
    assert run.model.weight.grad is None  # zeroed for the next mini-batch
    assert out["lr"] == 0.5 / 2  # the schedule advanced once


# torch warns that the schedule stepped without an optimizer step: here that is the point
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_non_finite_gradient_skips_the_update_and_counts_it():
    run = tiny_run(max_grad_norm=1.0)
    before = [p.detach().clone() for p in run.model.parameters()]
    run.model.weight.grad = torch.full((2, 3), float("nan"))
    run.model.bias.grad = torch.ones(2)
    out = run.optimizer_step()
    assert math.isnan(out["grad_norm"]) and out["skipped_update"] == 1.0
    assert all(torch.equal(b, p) for b, p in zip(before, run.model.parameters()))
    assert run.model.weight.grad is None and out["lr"] == 0.5 / 2


class _Head(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_prewarm_is_a_no_op_off_cuda():
    from srpo_fast.train.run import prewarm_logprob_kernel

    cfg = load_config(None, ["train.max_tokens_per_microbatch=1024"])
    assert prewarm_logprob_kernel(cfg, _Head(300, 32), torch.device("cpu")) == []


@pytest.mark.gpu
def test_prewarm_tunes_every_micro_batch_bucket_before_step_one():
    """On CUDA the fused log-prob kernel's autotuner runs at start-up for each N bucket up to the token budget."""
    from srpo_fast.kernels.linear_logprobs import n_bucket
    from srpo_fast.train.run import prewarm_logprob_kernel

    cfg = load_config(None, ["train.max_tokens_per_microbatch=1024", "model.dtype=bfloat16"])
    buckets = prewarm_logprob_kernel(cfg, _Head(4096, 256), torch.device("cuda"))
    assert buckets == sorted({n_bucket(n) for n in range(1, 1025, 256)}) and buckets
