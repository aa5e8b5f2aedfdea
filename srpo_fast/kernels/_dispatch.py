"""Backend choice and input checks shared by the kernel ops.

Why one place: every op picks Triton or its torch reference the same way (Triton on CUDA, torch on CPU,
``SRPO_FAST_KERNELS=torch|triton`` forces one) and rejects bad input with the same wording. Triton is
imported here, optionally, so ``import srpo_fast.kernels`` works on machines without it.
"""
from __future__ import annotations

import os

import torch

try:  # optional: CPU-only installs fall back to the torch references
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
BACKEND_ENV = "SRPO_FAST_KERNELS"


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, where Triton kernels run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Default: Triton on CUDA, torch elsewhere. ``SRPO_FAST_KERNELS=triton`` forces Triton (CPU tensors need
    ``TRITON_INTERPRET=1``); ``SRPO_FAST_KERNELS=torch`` forces the torch reference.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'torch', 'triton' or unset, got {forced!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{BACKEND_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        return "triton"
    return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math and output dtype: fp32, or fp64 for fp64 inputs (so gradcheck can run through the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype matching an accumulation torch dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_targets_in_range(targets: torch.Tensor, vocab: int) -> None:
    """Host-side range check (one device sync): kernels index logits with targets unchecked."""
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"targets must lie in [0, {vocab}); found {first} (pass check=False to skip this check)")


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit stride along the last dim; copy only when that is not so."""
    return t if t.stride(-1) == 1 else t.contiguous()
