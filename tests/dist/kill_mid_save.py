"""Subprocess for tests/utils/test_checkpoint.py: a save that is SIGKILLed half-way through writing.

    python tests/dist/kill_mid_save.py MODEL_DIR CKPT_ROOT

Saves step 1 normally and writes the step-1 weights to CKPT_ROOT/expected_step1.safetensors, takes one more
optimizer step, then starts saving step 2: after DCP has written the model/optimizer shards, the per-rank state
file gets half its bytes and the process kills itself with SIGKILL (no cleanup, no finally blocks), as a node
failure or the OOM killer would.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from srpo_fast.models.fsdp import build_optimizer  # noqa: E402
from srpo_fast.utils.checkpoint import save_checkpoint  # noqa: E402


def step(model, optimizer) -> None:
    ids = torch.randint(10, 1000, (1, 12))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def main(model_dir: str, root: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    optimizer = build_optimizer(model, 1e-3)
    step(model, optimizer)
    save_checkpoint(root, 1, model=model, optimizer=optimizer, extra={"data_pos": 1})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(Path(root) / "expected_step1.safetensors"))
    step(model, optimizer)

    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        if isinstance(f, io.IOBase):  # in-memory round trips are not the write we interrupt
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_half_then_die
    save_checkpoint(root, 2, model=model, optimizer=optimizer, extra={"data_pos": 2})
    raise AssertionError("unreachable: the save above kills the process")


if __name__ == "__main__":
    main(*sys.argv[1:])
