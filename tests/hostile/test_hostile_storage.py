"""A disk that fills up during a checkpoint (a real small tmpfs where this machine lets us mount one, else a real
RLIMIT_FSIZE in the saving process): one clear error with the path and the free space, no partial checkpoint left,
and a start-up clean-up that removes any process's leftovers (and restores a checkpoint caught between renames)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture
def small_fs(tmp_path):
    """(directory, fsize): a 2 MiB tmpfs (fsize None), or a plain directory and a 1 MiB file-size limit."""
    mount = tmp_path / "fs"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode == 0
    try:
        yield mount, (None if mounted else 1 << 20)
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_during_a_checkpoint(small_fs):
    root, fsize = small_fs
    args = [sys.executable, str(HERE / "full_disk_save.py"), str(root / "ckpt")]
    if fsize is not None:
        args += ["--fsize", str(fsize)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=100, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["small_saved"] == ["step_00000001"]
    message = out["big"]
    assert message.startswith("could not write checkpoint step 2 at ") and ".tmp_step_00000002" in message
    assert ("ENOSPC" if fsize is None else "EFBIG") in message and "MiB free" in message and "\n" not in message
    assert out["after_failure"] == ["step_00000001"]  # the partial step-2 dir is gone, step 1 untouched
    assert out["removed"] == [".tmp_step_00000009"]
    assert out["after_clean"] == ["step_00000001"]  # the checkpoint caught between its renames is back


def test_stale_exports_of_any_pid_are_removed(tmp_path):
    from srpo_fast.models.weights import remove_stale_exports

    out = tmp_path / "final_model"
    for name in (".final_model.tmp-4242", ".final_model.tmp-77", ".final_model.old-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    remove_stale_exports(out)  # no final_model yet: an .old dir may be the only complete export, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final_model.old-4242"]
    out.mkdir()
    remove_stale_exports(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
