"""Fused kernels for RL log-prob and loss computation: Triton on CUDA, torch references elsewhere.

    logp, ent = token_logprobs(logits, targets, temperature=1.0, return_entropy=True)
    logp, ent = linear_token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=True, bias=None)
    loss, metrics = grpo_loss(logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp=None, **options)

With ``return_entropy=False`` the two log-prob ops return ``logp`` alone (a tensor, not a tuple). Outputs are
fp32 (fp64 for fp64 inputs, so gradcheck can run through the kernels). Each op checks its inputs on the host
by default (``check=False`` skips the one check that syncs with the device).

Backend: Triton for CUDA tensors, the op's torch reference otherwise. Each op takes ``backend="auto"|"torch"|
"triton"``, which wins over the ``SRPO_FAST_KERNELS`` environment variable (same values); Triton on CPU tensors
needs ``TRITON_INTERPRET=1``, as the tests use. On CUDA, fp64 inputs, and fp32 inputs to the GEMM op while
``torch.get_float32_matmul_precision()`` is "highest", run the torch reference with a one-time warning (fp32
with "high"/"medium" uses tf32 tensor cores). Triton is optional: without it, everything runs on the torch
references. ``python -m srpo_fast.kernels.compile_check`` compiles every Triton variant for sm_90/sm_80 on a
machine without a GPU and reports registers, spills, shared memory, tensor cores and SASS cost.
"""
from .grpo_loss import grpo_loss
from .linear_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["grpo_loss", "linear_token_logprobs", "token_logprobs"]
