"""Counting the operations that make the host wait for the GPU, on any device (CPU included).

Why: a device→host synchronization in the step loop (`.item()`, `bool(tensor)`, `.tolist()`, `.cpu()`, an op whose
output size depends on the data like `nonzero` or boolean indexing) stalls the GPU's queue once per call. On a GPU
`torch.cuda.set_sync_debug_mode("error")` catches them, but only there; this counts the same operations on CPU
tensors, so a test on a machine without a GPU can assert that a hot path has none. Each count is keyed by the
operation and the innermost srpo_fast source line that caused it.

    with count_host_syncs() as syncs:
        step()
    assert not syncs.outside(ALLOWED)      # {(op, "srpo_fast/models/forward.py:123"): count}
"""
from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = Path(__file__).resolve().parent.parent  # the srpo_fast package
# aten ops that need the values on the host (scalars, data-dependent output sizes) or compare on the host
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), bool(t), int(t), float(t), t == python scalar in `if`
    "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.argwhere", "aten.unique_consecutive",
    "aten._unique2", "aten.unique_dim", "aten.equal", "aten.is_nonzero",
})
# Python-level methods that copy to the host without an aten op when the tensor is already on the CPU
_METHODS = ("tolist", "cpu", "numpy")


def _site() -> str:
    """The innermost srpo_fast frame of the current stack, as 'srpo_fast/…/file.py:line', followed by ' via PKG'
    when the operation runs inside another package called from there (PKG: that library, e.g. transformers; torch
    only when no other library is in between)."""
    packages: list[str] = []
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.name == "host_syncs.py":
            continue
        if _ROOT in path.parents:
            via = next((p for p in packages if p != "torch"), packages[0] if packages else None)
            return f"{path.relative_to(_ROOT.parent)}:{frame.lineno}" + (f" via {via}" if via else "")
        if "site-packages" in path.parts:
            packages.append(path.parts[path.parts.index("site-packages") + 1])
    return "elsewhere"


class HostSyncCounter(Counter):
    def outside(self, allowed_files: tuple[str, ...] = ()) -> dict[tuple[str, str], int]:
        """The counts whose site is not in one of allowed_files (paths like 'srpo_fast/models/attention.py')."""
        return {key: n for key, n in self.items() if key[1].split(":")[0] not in allowed_files}

    def in_own_code(self) -> dict[tuple[str, str], int]:
        """The counts caused by srpo_fast's own lines (not inside another package's code)."""
        return {key: n for key, n in self.items() if " via " not in key[1]}


class _Mode(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS or (name == "aten.index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))):
            self.counter[(name, _site())] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """Count host-synchronizing operations (see the module docstring) inside the block, in every thread that
    dispatches through this one (autograd's backward included)."""
    counter = HostSyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            counter[(f"Tensor.{name}", _site())] += 1
            return original(self, *args, **kwargs)
        return counted

    for name in _METHODS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with _Mode(counter):
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
