"""Subprocess for tests/hostile/test_hostile_storage.py: checkpoint saves onto a filesystem that runs out of room.

    python tests/hostile/full_disk_save.py ROOT [--fsize BYTES]

ROOT is on a small tmpfs (ENOSPC), or, where mounting is not possible, --fsize sets RLIMIT_FSIZE for this process
(EFBIG: a real limit of the kernel, not a mock). Prints one JSON line: what happened at each stage.
"""
from __future__ import annotations

import json
import resource
import signal
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from srpo_fast.utils.checkpoint import StorageError, clean_partial, save_checkpoint  # noqa: E402


def main(root: str, fsize: int | None) -> None:
    if fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    root = Path(root)
    torch.manual_seed(0)
    small = nn.Linear(8, 8)
    big = nn.Linear(1024, 1024)  # 4 MiB of weights, 12 MiB with Adam's state
    out: dict = {}
    save_checkpoint(root, 1, model=small, optimizer=torch.optim.AdamW(small.parameters()))
    out["small_saved"] = sorted(p.name for p in root.iterdir())
    optimizer = torch.optim.AdamW(big.parameters())
    big(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    try:
        save_checkpoint(root, 2, model=big, optimizer=optimizer)
        out["big"] = "saved"
    except StorageError as exc:
        out["big"] = str(exc.strerror)
        out["errno"] = exc.errno
    out["after_failure"] = sorted(p.name for p in root.iterdir())
    # a partial dir left by some other (killed) process, filling what is left, and one killed between renames
    filler = root / ".tmp_step_00000009"
    filler.mkdir()
    try:
        with open(filler / "shard", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
    except OSError:
        pass
    (root / "step_00000001").rename(root / ".old_step_00000001")
    out["removed"] = [p.name for p in clean_partial(root)]
    out["after_clean"] = sorted(p.name for p in root.iterdir())
    print(json.dumps(out))


if __name__ == "__main__":
    args = sys.argv[1:]
    fsize = int(args[args.index("--fsize") + 1]) if "--fsize" in args else None
    main(args[0], fsize)
