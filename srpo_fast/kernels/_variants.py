"""What the compile check builds: each op module lists its selectable kernel variants with ``compile_variants()``.

Why here and not in the compile check: the op file knows which configs its launcher and autotuner can pick, so
it owns that list; the compile check (``python -m srpo_fast.kernels.compile_check``) only compiles what it is
given. This module is import-light (no Triton compiler internals) so op modules can use it freely.

A variant is one launch as the launcher would issue it: the ``@triton.jit`` function (or the Autotuner /
Heuristics wrapping it), every argument value (``TensorArg`` for tensors, plain ints / floats, constexprs),
and the launch options. Argument values matter: Triton specializes on them (an int equal to 1 becomes a
constant, ints divisible by 16 and 16-byte-aligned pointers get divisibility hints), so a variant carries the
values a real launch at the shipped shapes passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Shapes we ship configs for: Qwen2.5-VL 3B / 7B / 32B hidden sizes, their LM-head widths (151,936 for 3B,
# 152,064 for 7B and 32B), and token counts covering every specialization class Triton distinguishes
# (1 -> a constant, odd, divisible by 16) up to 64k tokens.
HIDDEN_SIZES = (2048, 3584, 5120)
VOCAB_SIZES = (151936, 152064)
TOKEN_COUNTS = (1, 4097, 65536)
# the dtypes the dispatcher can send to Triton on CUDA (fp64 goes to the torch reference there)
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument of the given dtype (16-byte aligned, as the caching allocator returns)."""

    dtype: torch.dtype


@dataclass
class KernelVariant:
    """One compile unit: a kernel with the argument values and options of one launch the project can make.

    op: the op it belongs to ("token_logprobs"); name: a short unique label within the op;
    args: argument name -> value for every parameter without a default (TensorArg for tensors);
    gemm: the kernel multiplies matrices (``tl.dot``), so it must compile to tensor-core instructions;
    stream_elems: elements one iteration of the steady (innermost, loading) loop consumes per program, for
        kernels that stream a tensor: the check reports SASS instructions per element from it;
    sass_budget: the most SASS instructions per streamed element the op allows itself (a selectable variant
        above it fails the check); None: reported only;
    selectable: the launcher or autotuner can pick it (a compile error, spill or shared-memory overflow in a
        selectable variant fails the check; unselectable ones are reported only);
    min_arch: the lowest arch (e.g. 90) the dispatcher sends these inputs to Triton on; below it the variant is
        compiled and reported but not selectable;
    group: the autotuner's candidates for one launch share a group: one over the shared-memory limit is pruned by
        the autotuner (reported, not a failure), but a group with no config that fits fails the check;
    fast: part of the quick subset the test suite compiles;
    shape: facts for the report (N, H, V, dtype, ...).
    """

    op: str
    name: str
    kernel: object
    args: dict
    num_warps: int
    num_stages: int = 3
    gemm: bool = False
    stream_elems: int | None = None
    sass_budget: float | None = None
    selectable: bool = True
    group: str | None = None
    min_arch: int | None = None
    fast: bool = False
    shape: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.op}:{self.name}"
