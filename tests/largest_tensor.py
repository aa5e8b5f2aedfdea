"""A TorchDispatchMode that records the largest tensor any torch op produces: how the memory tests prove that no
[N, V] logits or [L, L] mask is ever built."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Largest output of every dispatched op, in elements (`numel`) and in bytes (`nbytes`). Bytes matter under the
    Triton interpreter, which copies each kernel argument's storage as a uint8 tensor."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out
