"""Backend choice and input checks shared by the kernel ops.

Why one place: every op picks Triton or its torch reference by the same rules and rejects bad input with the
same wording. The choice itself (``decide``) is a pure function of the op, dtype, device type, the requested
backend, ``torch.get_float32_matmul_precision()`` and whether the interpreter is on, so it is tested on CPU;
``choose`` feeds it the live values and warns once per distinct fallback. Triton is imported here,
optionally, so ``import srpo_fast.kernels`` works on machines without it.

Rules: ``backend=`` on the call wins over ``SRPO_FAST_KERNELS``; either may say auto (the default), torch or
triton. Auto means Triton on CUDA, torch elsewhere; forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1``.
On CUDA, some inputs never reach Triton even when it is forced, because no kernel config can launch well or
at all; they run the torch reference with a one-time warning: fp64 (no GEMM tile fits shared memory, and fp64
has no tensor cores), dtypes other than bf16/fp16/fp32/fp64, and fp32 ``linear_token_logprobs`` while
``torch.get_float32_matmul_precision()`` is "highest" (full-fp32 ``tl.dot`` is FMA code that spills; "high"
or "medium" allow tf32 tensor cores, as they do for torch's own matmuls). The GEMM op also needs a GPU whose
shared memory holds one of its autotune tiles: fp32 (tf32) tiles need sm_90's 227 KB (the compile check finds
no candidate within sm_80's 163 KB), and GPUs before sm_80 are not compiled for at all.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

try:  # optional: CPU-only installs fall back to the torch references
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
BACKEND_ENV = "SRPO_FAST_KERNELS"
BACKENDS = ("auto", "torch", "triton")
GEMM_OPS = ("linear_token_logprobs",)  # ops whose Triton kernels multiply matrices with tl.dot
TRITON_CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# lowest compute capability at which each input dtype of a GEMM op has a launchable autotune candidate
# (read off `python -m srpo_fast.kernels.compile_check`: shared memory per tile vs the arch limit)
GEMM_MIN_CAPABILITY = {torch.bfloat16: (8, 0), torch.float16: (8, 0), torch.float32: (9, 0)}


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, where Triton kernels run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Choice:
    """Where an op runs: ``backend`` "triton" or "torch"; ``precision``: tl.dot's input precision for fp32
    GEMM inputs ("tf32", or "ieee" in the interpreter), else None; ``fallback``: why an input that asked for
    (or would default to) Triton runs the torch reference instead, said once as a warning."""

    backend: str
    precision: str | None = None
    fallback: str | None = None


def _requested(name: str, value: str | None) -> str:
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS} (or unset), got {value!r}")
    return value


def decide(op: str, dtype: torch.dtype, device_type: str, *, backend: str | None = None, env: str | None = None,
           fp32_precision: str = "highest", capability: tuple[int, int] | None = None, interpret: bool = False,
           has_triton: bool = True) -> Choice:
    """The backend rules (module docstring) as a pure function; raises ValueError for an unknown backend
    name and RuntimeError when Triton is forced where it cannot run at all."""
    want = _requested("backend", backend)
    if want == "auto":
        want = _requested(BACKEND_ENV, env)
    if want == "torch":
        return Choice("torch")
    runnable = has_triton and (device_type == "cuda" or interpret)
    if want == "triton" and not runnable:
        if not has_triton:
            raise RuntimeError(f"{op}: the Triton backend was requested but triton is not installed")
        raise RuntimeError(f"{op}: the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for "
                           f"{device_type} tensors")
    if not runnable or (want == "auto" and device_type != "cuda"):
        return Choice("torch")
    if device_type != "cuda":  # the interpreter: every dtype, exact fp32 dots, for tests
        return Choice("triton", "ieee" if dtype == torch.float32 and op in GEMM_OPS else None)
    if dtype == torch.float64:
        return Choice("torch", fallback=f"{op}: fp64 inputs on CUDA run the torch reference (no Triton config of "
                                        "this op is built for fp64)")
    if dtype not in TRITON_CUDA_DTYPES:
        return Choice("torch", fallback=f"{op}: {dtype} inputs run the torch reference (Triton kernels take "
                                        "bf16, fp16 and fp32)")
    if op in GEMM_OPS and capability is not None and tuple(capability) < GEMM_MIN_CAPABILITY[dtype]:
        need = "sm_{}{}".format(*GEMM_MIN_CAPABILITY[dtype])
        return Choice("torch", fallback=f"{op}: {dtype} inputs on sm_{capability[0]}{capability[1]} run the torch "
                                        f"reference (no Triton tile config fits below {need})")
    if dtype == torch.float32 and op in GEMM_OPS:
        if fp32_precision == "highest":
            return Choice("torch", fallback=f"{op}: fp32 inputs with torch.get_float32_matmul_precision() == "
                                            "'highest' run the torch reference (full-fp32 tl.dot has no tensor "
                                            "cores); torch.set_float32_matmul_precision('high') enables tf32")
        return Choice("triton", "tf32")
    return Choice("triton")


_WARNED: set[str] = set()


def choose(op: str, tensor: torch.Tensor, backend: str | None = None) -> Choice:
    """``decide`` for this tensor's dtype and device under the live settings; warns once per fallback reason."""
    capability = torch.cuda.get_device_capability(tensor.device) if tensor.is_cuda else None
    choice = decide(op, tensor.dtype, tensor.device.type, backend=backend, env=os.environ.get(BACKEND_ENV),
                    fp32_precision=torch.get_float32_matmul_precision(), capability=capability,
                    interpret=interpreting(), has_triton=HAS_TRITON)
    if choice.fallback and choice.fallback not in _WARNED:
        _WARNED.add(choice.fallback)
        warnings.warn(choice.fallback, RuntimeWarning, stacklevel=3)
    return choice


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """"triton" or "torch" for tensors on ``device`` by the device and the requested backend alone, for callers
    with no input dtype yet (e.g. warming a kernel up); an op call goes through ``choose``."""
    return decide("any", torch.bfloat16, device.type, backend=backend, env=os.environ.get(BACKEND_ENV),
                  interpret=interpreting(), has_triton=HAS_TRITON).backend


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision for a GEMM kernel's input dtype: fp32 reaches Triton on CUDA only when
    ``decide`` allowed tf32; the interpreter computes fp32 dots exactly ("ieee"); half precision: None."""
    if dtype != torch.float32:
        return None
    return "ieee" if interpreting() else "tf32"


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s GPU the current device while Triton launches (it launches on the current device,
    so tensors on cuda:1 would otherwise be read from a kernel running on cuda:0)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


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
