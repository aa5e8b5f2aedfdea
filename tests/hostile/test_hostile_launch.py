"""The test launcher's torchrun listens on the loopback interface only (plain `torchrun --standalone` has its agent's
stores listen on every interface)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.dist]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist.launch import TORCHRUN  # noqa: E402

WORKER = """
import time, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
time.sleep(3)
dist.destroy_process_group()
"""


def listening(pids: set[int]) -> list[str]:
    """Local addresses the given processes listen on (TCP), from ss."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]


@pytest.mark.skipif(subprocess.run(["which", "ss"], capture_output=True).returncode != 0, reason="needs ss")
def test_rendezvous_listens_on_loopback_only(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            seen += listening({proc.pid, *map(int, children)})
            time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert seen, "saw no listening socket at all"
    assert all(addr.startswith("127.0.0.1:") for addr in seen), seen
